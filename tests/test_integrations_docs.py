"""docs/integrations.md: its examples run as printed (read from the page). The Tunix example runs in
tests/test_tunix_integration.py."""

import contextlib
import io
import os

from doc_examples import INTEGRATIONS, REPO, examples, run_example


def test_the_page_marks_the_examples_the_tests_run():
  assert set(examples()) == {"own_loop", "tunix"}
  assert "<!-- example: tunix -->" in open(INTEGRATIONS).read()
  with open(os.path.join(REPO, "tests", "test_tunix_integration.py")) as f:
    assert 'run_example("tunix")' in f.read()


def test_own_jitted_loop_example_trains_the_policy():
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    namespace = run_example("own_loop")
  assert out.getvalue() == "pass rate 0.90 after 50 steps\n"  # the output the page quotes
  assert "It prints `pass rate 0.90 after 50 steps`" in open(INTEGRATIONS).read()
  assert namespace["logits"].shape == (8, 20) and float(namespace["pass_rate"]) > 0.5  # from 0.05
