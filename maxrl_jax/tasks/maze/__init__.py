"""Maze navigation, the paper's procedural task: `env` (generator, BFS, tokens, verifier), `dataset` (TFDS
splits without TensorFlow), `task` (the Task a trainer runs: data streams, held-out bookkeeping, metrics)."""


def make_task(config):
  """The maze Task of a config (configs/maze.py); imported on use, so `env` stays light."""
  from maxrl_jax.tasks.maze import task  # pylint: disable=import-outside-toplevel

  return task.MazeTask(config)
