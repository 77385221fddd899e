"""What the fault tests of every trainer read and damage in a workdir (imported by test_*faults.py)."""

import json
import os

from maxrl_jax import config_fields


def with_overrides(config, overrides):
  """`config` with dotted-key overrides applied in place ({"rl.steps": 4}); returns it."""
  config_fields.set_fields(config, overrides)
  return config


def metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


def without(records, fields):
  """The records without `fields` (wall-clock timings, which differ between any two runs)."""
  return [{k: v for k, v in r.items() if k not in fields} for r in records]


def summary(workdir):
  with open(os.path.join(workdir, "summary.json")) as f:
    return json.load(f)


def flip_bytes(path, count=400):
  """Corrupts `count` bytes spread over the file (a damaged checkpoint)."""
  with open(path, "r+b") as f:
    data = bytearray(f.read())
    for i in range(min(count, len(data))):
      data[(i * 7919) % len(data)] ^= 0xFF
    f.seek(0)
    f.write(data)


def largest_file(directory):
  files = [os.path.join(r, n) for r, _, ns in os.walk(directory) for n in ns]
  return max(files, key=os.path.getsize)
