"""docs/integrations.md: its examples run as printed (read from the page), and the page and the notebook are
what the tests and CI use. The Tunix example runs in tests/test_tunix_integration.py."""

import ast
import contextlib
import io
import json
import os

from doc_examples import INTEGRATIONS, REPO, examples, run_example

NOTEBOOK = os.path.join(REPO, "docs", "notebooks", "quickstart.ipynb")


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


def test_the_notebook_is_committed_without_outputs():
  with open(NOTEBOOK, encoding="utf-8") as f:
    notebook = json.load(f)
  assert notebook["nbformat"] == 4 and notebook["metadata"]["kernelspec"]["name"] == "python3"
  code = [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]
  assert code, "no code cells"
  for cell in code:
    assert cell["outputs"] == [] and cell["execution_count"] is None, "".join(cell["source"])[:80]
  for cell in notebook["cells"]:
    assert not cell.get("attachments") and "execution" not in cell.get("metadata", {}), cell.get("id")
  source = "".join(code[0]["source"])
  assert 'REPO_URL = ""' in source  # the placeholder a Colab user sets; unused where the package is installed
  for cell in code:
    ast.parse("".join(cell["source"]))  # valid Python (CI executes it: .ci/run)
