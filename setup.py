"""Installs maxrl_jax: Maximum Likelihood Reinforcement Learning in JAX.

    pip install maxrl_jax               # estimators and metrics: jax and numpy only
    pip install "maxrl_jax[train]"      # + the trainers (flax, optax, orbax, TFDS without TensorFlow, ...)
    pip install -e ".[test]"            # a clone: everything the trainers and the test suite need

`configs/` and `experiments/` are not installed: they are run from the repository root
(`python -m maxrl_jax.main --config=configs/maze.py ...`, `python -m experiments.maze_objectives ...`).
"""

import setuptools

# Everything `maxrl_jax.estimators` and `maxrl_jax.metrics` import.
CORE = [
    "jax>=0.6",
    "numpy",
]

# The trainers, datasets, checkpoints and plots.
TRAIN = [
    "flax>=0.10",
    "optax>=0.2.4",
    "orbax-checkpoint>=0.11",
    # TFDS reads and writes ArrayRecord without TensorFlow; array_record is its backend.
    "tensorflow-datasets>=4.9.7",
    "array_record>=0.5",
    "etils[epath]",
    "ml_collections>=0.1.1",
    "absl-py",
    "tqdm",
    "matplotlib",
    # Language models (maxrl_jax.text): tokenizer.json through the Rust tokenizers library.
    "tokenizers>=0.15",
]

EXTRAS = {
    "train": TRAIN,
    # Language models: jinja chat templates, symbolic answer checking, parquet data, Hugging Face Hub ids
    # (--config.model.path=OWNER/NAME, --config.data.train_path=hf:OWNER/NAME/SUBSET) through the Hub's cache.
    "text": TRAIN + ["jinja2", "sympy", "pyarrow", "huggingface_hub"],
    # Optional Weights & Biases logging (--config.logging.wandb=True).
    "wandb": ["wandb"],
    # pytest-xdist: the README's test command runs the suite in 2 processes (`-n 2 --dist loadfile`).
    "test": TRAIN + ["pytest>=7", "pytest-xdist>=3", "scipy", "jinja2", "sympy"],
}
EXTRAS["all"] = sorted(set(sum(EXTRAS.values(), [])))

setuptools.setup(
    name="maxrl_jax",
    version="0.1.0",
    description=(
        "Maximum Likelihood Reinforcement Learning (MaxRL) in JAX/Flax: estimators, "
        "a jitted rollout sampler, verifiers and on-policy trainers."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11",
    packages=setuptools.find_packages(include=["maxrl_jax", "maxrl_jax.*"]),
    install_requires=CORE,
    extras_require=EXTRAS,
)
