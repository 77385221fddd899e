"""Installs maxrl_jax: Maximum Likelihood Reinforcement Learning in JAX."""

import setuptools

setuptools.setup(
    name="maxrl_jax",
    version="0.1.0",
    description=(
        "Maximum Likelihood Reinforcement Learning (MaxRL) in JAX/Flax: estimators, "
        "a jitted rollout sampler, verifiers and on-policy trainers."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=setuptools.find_packages(include=["maxrl_jax", "maxrl_jax.*", "experiments", "experiments.*"]),
    install_requires=[
        "jax>=0.6",
        "flax>=0.10",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        # TFDS reads and writes ArrayRecord without TensorFlow; array_record is its backend.
        "tensorflow-datasets>=4.9.7",
        "array_record>=0.5",
        "ml_collections>=0.1.1",
        "absl-py",
        "numpy",
        "tqdm",
        "matplotlib",
        # Language models (maxrl_jax.text): tokenizer.json through the Rust tokenizers library.
        "tokenizers>=0.15",
    ],
    extras_require={
        "test": ["pytest>=7", "scipy", "jinja2", "sympy"],
        # Optional for language models: jinja chat templates, symbolic answer checking, parquet data.
        "text": ["jinja2", "sympy", "pyarrow"],
    },
)
