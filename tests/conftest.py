"""Test-session setup: run on the CPU unless told otherwise, before JAX is imported anywhere."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
