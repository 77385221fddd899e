"""Packaging: the light core install, the extras, what is installed, LICENSE and CITATION.cff."""

import ast
import json
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Packages the training stack brings; `import maxrl_jax.estimators, maxrl_jax.metrics` must load none of them.
HEAVY = ("flax", "optax", "orbax", "tensorflow_datasets", "array_record", "matplotlib", "tokenizers",
         "ml_collections", "tqdm", "absl", "torch", "transformers")

# Third-party modules imported by maxrl_jax/ -> the distribution that provides them.
DISTRIBUTIONS = {
    "jax": "jax", "numpy": "numpy", "ml_dtypes": "jax",  # ml_dtypes comes with jax
    "flax": "flax", "optax": "optax", "orbax": "orbax-checkpoint", "tensorflow_datasets": "tensorflow-datasets",
    "array_record": "array_record", "etils": "etils", "ml_collections": "ml_collections", "absl": "absl-py",
    "tqdm": "tqdm", "matplotlib": "matplotlib", "PIL": "matplotlib",  # Pillow comes with matplotlib
    "tokenizers": "tokenizers", "jinja2": "jinja2", "sympy": "sympy", "pyarrow": "pyarrow", "wandb": "wandb",
    "huggingface_hub": "huggingface_hub",
}


def _setup_metadata() -> dict:
  """install_requires, extras_require and packages of setup.py, read without building anything."""
  code = ("import json, setuptools\n"
          "from distutils.core import run_setup\n"
          "d = run_setup('setup.py', stop_after='init')\n"
          "print(json.dumps({'install_requires': d.install_requires, 'extras': d.extras_require, "
          "'packages': d.packages, 'license': d.metadata.license}))\n")
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def _name(requirement: str) -> str:
  return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


@pytest.fixture(scope="module")
def metadata():
  return _setup_metadata()


def test_core_install_is_jax_and_numpy(metadata):
  assert sorted(_name(r) for r in metadata["install_requires"]) == ["jax", "numpy"]
  train = {_name(r) for r in metadata["extras"]["train"]}
  assert {"flax", "optax", "orbax-checkpoint", "tensorflow-datasets", "array-record", "ml-collections",
          "absl-py", "tqdm", "matplotlib", "tokenizers"} <= train
  test = {_name(r) for r in metadata["extras"]["test"]}
  assert train <= test and "pytest" in test  # `pip install -e ".[test]"` installs the whole training stack.
  assert metadata["license"] == "Apache-2.0"


def test_only_the_package_is_installed(metadata):
  packages = set(metadata["packages"])
  assert not any(p.split(".")[0] in ("experiments", "configs", "tests", "scripts") for p in packages)
  on_disk = {os.path.relpath(root, REPO).replace(os.sep, ".") for root, _, files in
             os.walk(os.path.join(REPO, "maxrl_jax")) if "__init__.py" in files}
  assert on_disk <= packages, on_disk - packages


def test_every_third_party_import_is_declared(metadata):
  declared = {_name(r) for r in metadata["install_requires"]}
  for extra in ("train", "text", "wandb"):
    declared |= {_name(r) for r in metadata["extras"][extra]}
  missing = {}
  for root, _, files in os.walk(os.path.join(REPO, "maxrl_jax")):
    for name in files:
      if not name.endswith(".py"):
        continue
      path = os.path.join(root, name)
      with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
      for node in ast.walk(tree):
        modules = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                   [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
        for module in modules:
          top = module.split(".")[0]
          if top in sys.stdlib_module_names or top in ("maxrl_jax", "__future__"):
            continue
          if top in ("torch", "transformers"):  # only in docstrings' examples and optional comparisons
            continue
          dist = DISTRIBUTIONS.get(top)
          if dist is None or dist.lower().replace("_", "-") not in declared:
            missing.setdefault(top, os.path.relpath(path, REPO))
  assert not missing, f"imported but not declared in setup.py: {missing}"


def test_estimators_and_metrics_import_without_the_training_stack():
  code = ("import sys\n"
          "import maxrl_jax.estimators, maxrl_jax.metrics\n"
          f"print([m for m in {HEAVY!r} if m in sys.modules])\n")
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout


def test_configs_and_experiments_import_from_the_repository_root():
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  code = "import configs.maze, experiments; print(configs.maze.__file__, experiments.__file__)"
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert all(p.startswith(REPO) for p in out.stdout.split())


def test_license_and_citation():
  with open(os.path.join(REPO, "LICENSE"), encoding="utf-8") as f:
    license_text = f.read()
  assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
  assert "END OF TERMS AND CONDITIONS" in license_text
  with open(os.path.join(REPO, "CITATION.cff"), encoding="utf-8") as f:
    cff_text = f.read()
  assert "cff-version: 1.2.0" in cff_text and "arXiv:2602.02710" in cff_text
  yaml = pytest.importorskip("yaml", reason="PyYAML parses CITATION.cff")
  cff = yaml.safe_load(cff_text)
  paper = cff["preferred-citation"]
  assert paper["title"] == "Maximum Likelihood Reinforcement Learning" and paper["year"] == 2026
  assert [a["family-names"] for a in paper["authors"]][:1] == ["Tajwar"] and len(paper["authors"]) == 10
  with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
    readme = f.read()
  assert "@article{" in readme and "2602.02710" in readme
