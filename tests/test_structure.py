"""The package's structure: no import cycle inside maxrl_jax, no module reaching for another module's private
names, and the layers of docs/architecture.md (the math, models and sampling know no task, the RL step no
trainer, tasks no trainer)."""

import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "maxrl_jax")


def _modules() -> dict[str, str]:
  """{dotted module name: path} of every module of maxrl_jax."""
  out = {}
  for directory, _, names in os.walk(ROOT):
    for name in names:
      if name.endswith(".py"):
        rel = os.path.relpath(os.path.join(directory, name), os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
        out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(directory, name)
  return out


MODULES = _modules()


def _imports(path: str) -> tuple[set[str], list[tuple[str, str]]]:
  """(maxrl_jax modules `path` imports, [(alias, attribute)] of attribute accesses on imported modules)."""
  tree = ast.parse(open(path).read())
  imported, aliases = set(), {}
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("maxrl_jax"):
      for alias in node.names:
        full = f"{node.module}.{alias.name}"
        target = full if full in MODULES else node.module
        imported.add(target)
        aliases[alias.asname or alias.name] = target
    elif isinstance(node, ast.Import):
      for alias in node.names:
        if alias.name.startswith("maxrl_jax"):
          imported.add(alias.name)
          aliases[alias.asname or alias.name] = alias.name
  accesses = [(node.value.id, node.attr) for node in ast.walk(tree)
              if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases]
  return imported, accesses


GRAPH = {name: _imports(path) for name, path in MODULES.items()}


def test_no_import_cycle_inside_the_package():
  state = {}

  def visit(name, trail):
    if state.get(name) == "done":
      return
    if state.get(name) == "active":
      cycle = trail[trail.index(name):] + [name]
      pytest.fail("import cycle: " + " -> ".join(cycle))
    state[name] = "active"
    for other in sorted(GRAPH[name][0]):
      if other in GRAPH and other != name:
        visit(other, trail + [name])
    state[name] = "done"

  for module in sorted(GRAPH):
    visit(module, [])


def test_no_module_uses_another_modules_private_names():
  offenders = [f"{name}: {alias}.{attr}" for name, (_, accesses) in GRAPH.items() for alias, attr in accesses
               if attr.startswith("_") and not attr.startswith("__")]
  assert not offenders, offenders


@pytest.mark.parametrize("layer, forbidden", [
    (("maxrl_jax.estimators", "maxrl_jax.metrics", "maxrl_jax.sampling", "maxrl_jax.models"),
     ("maxrl_jax.tasks", "maxrl_jax.rl", "maxrl_jax.trainers", "maxrl_jax.train")),
    (("maxrl_jax.rl",), ("maxrl_jax.tasks", "maxrl_jax.trainers", "maxrl_jax.train")),
    (("maxrl_jax.tasks",), ("maxrl_jax.trainers", "maxrl_jax.train", "maxrl_jax.rl")),
    (("maxrl_jax.trainers",), ("maxrl_jax.train", "maxrl_jax.main")),
])
def test_layers_import_only_the_layers_below(layer, forbidden):
  inside = lambda module, prefixes: any(module == p or module.startswith(p + ".") for p in prefixes)
  bad = [f"{name} imports {other}" for name, (imported, _) in GRAPH.items() if inside(name, layer)
         for other in imported if inside(other, forbidden)]
  assert not bad, bad
