"""The code examples of docs/integrations.md, read from the page itself so that the tests run what it shows.

An example is the fenced ```python block right after a line `<!-- example: NAME -->`.
"""

import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INTEGRATIONS = os.path.join(REPO, "docs", "integrations.md")

_EXAMPLE = re.compile(r"^<!-- example: ([\w-]+) -->\n```python\n(.*?)^```$", re.M | re.S)


def examples(path: str = INTEGRATIONS) -> dict[str, str]:
  """{name: code} of every marked example of the page (a name used twice is an error)."""
  with open(path, encoding="utf-8") as f:
    text = f.read()
  found = {}
  for name, code in _EXAMPLE.findall(text):
    if name in found:
      raise ValueError(f"{path}: example {name!r} is marked twice.")
    found[name] = code
  if text.count("<!-- example:") != len(found):
    raise ValueError(f"{path}: an `<!-- example: NAME -->` line is not followed by a ```python block.")
  return found


def run_example(name: str, path: str = INTEGRATIONS) -> dict:
  """Executes example `name` in a fresh namespace (as a script would) and returns that namespace."""
  namespace = {"__name__": "__main__"}
  code = compile(examples(path)[name], f"{os.path.relpath(path, REPO)}:{name}", "exec")
  exec(code, namespace)  # pylint: disable=exec-used
  return namespace
