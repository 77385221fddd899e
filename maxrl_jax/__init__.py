"""maxrl_jax: Maximum Likelihood Reinforcement Learning in JAX/Flax."""
