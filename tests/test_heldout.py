"""Held-out mazes are never trained on: identities, the jitted exclusion, the TFDS train split, the trainer.

7 x 7 is the setting where overlap is otherwise certain: its 3 x 3 cell grid has 192 spanning trees, so 64
held-out mazes take about 45% of the Prim law and thousands of training draws hit them hundreds of times.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxrl_jax.tasks.maze import task as maze_task
from maxrl_jax.tasks.maze import env as maze
from maxrl_jax.tasks.maze import dataset as maze_dataset

_generate = jax.jit(maze.generate_mazes, static_argnums=(1, 2))
_draw = jax.jit(maze.draw_training_mazes, static_argnums=(1, 2))


def _rows(grids):
  return {np.asarray(g, np.int8).tobytes() for g in np.asarray(grids)}


@pytest.mark.parametrize("size", [5, 7, 9])
def test_passage_bits_and_hashes_identify_mazes(size):
  grids = np.asarray(_generate(jax.random.key(size), 4096, size))
  distinct_grids = len(_rows(grids))
  bits = np.asarray(maze.passage_bits(jnp.asarray(grids)))
  assert bits.shape == (4096, maze.num_passages(size))
  assert len({row.tobytes() for row in np.packbits(bits, axis=1)}) == distinct_grids
  # A spanning tree over n^2 cells carves exactly n^2 - 1 passages.
  n = (size - 1) // 2
  np.testing.assert_array_equal(bits.sum(axis=1), n * n - 1)
  hashes = np.asarray(maze.maze_hashes(jnp.asarray(grids)))
  assert hashes.dtype == np.uint32
  if maze.num_passages(size) <= 32:  # Injective: as many hashes as mazes.
    assert len(np.unique(hashes)) == distinct_grids
  # Equal mazes, equal hashes (what the exclusion relies on), whatever the batch shape.
  np.testing.assert_array_equal(np.asarray(maze.maze_hashes(jnp.asarray(grids[:4].reshape(2, 2, size, size)))),
                                hashes[:4].reshape(2, 2))


def test_in_table_is_exact_membership():
  table = jnp.asarray(np.array([3, 9, 200, 4_000_000_000], np.uint32))
  queries = jnp.asarray(np.array([0, 3, 4, 9, 201, 4_000_000_000, 4_294_967_295], np.uint32))
  np.testing.assert_array_equal(np.asarray(maze.in_table(queries, table)), [0, 1, 0, 1, 0, 1, 0])
  assert not np.any(np.asarray(maze.in_table(queries, jnp.zeros((0,), jnp.uint32))))


def test_training_draws_exclude_heldout_mazes_where_overlap_is_otherwise_certain():
  size = 7
  heldout = np.asarray(_generate(jax.random.key(100), 4096, size))[:64]
  table = jnp.asarray(maze.hash_table(heldout))
  plain = np.asarray(_generate(jax.random.key(5), 4096, size))
  hits = np.array([g.tobytes() in _rows(heldout) for g in plain.astype(np.int8)])
  assert hits.sum() > 1000  # Without exclusion, about 45% of training draws are held-out mazes.

  drawn, redraws = _draw(jax.random.key(5), 4096, size, table)
  drawn = np.asarray(drawn)
  assert not _rows(drawn) & _rows(heldout)  # Compared grid by grid: no held-out maze is drawn.
  assert int(maze.count_in_table(jnp.asarray(drawn), table)) == 0
  assert int(redraws) >= hits.sum()
  # Draws that were not held out are unchanged: the same keys give the same mazes as generate_mazes.
  np.testing.assert_array_equal(drawn[~hits], plain[~hits])
  # Without a table the draw is generate_mazes itself.
  np.testing.assert_array_equal(np.asarray(_draw(jax.random.key(5), 4096, size, None)[0]), plain)


def test_redrawn_mazes_follow_the_prim_law_conditioned_on_not_held_out():
  # Among draws that are not held out, each maze's frequency is the same with or without exclusion.
  size = 7
  heldout = np.asarray(_generate(jax.random.key(100), 4096, size))[:16]
  table = jnp.asarray(maze.hash_table(heldout))
  drawn = np.asarray(_draw(jax.random.key(11), 4096, size, table)[0])
  plain = np.asarray(_generate(jax.random.key(12), 4096, size))
  plain = plain[~np.asarray(maze.in_table(maze.maze_hashes(jnp.asarray(plain)), table))]
  h_drawn = np.asarray(maze.maze_hashes(jnp.asarray(drawn)))
  h_plain = np.asarray(maze.maze_hashes(jnp.asarray(plain)))
  keys = np.union1d(h_drawn, h_plain)
  a = np.array([np.sum(h_drawn == k) for k in keys], np.float64)
  b = np.array([np.sum(h_plain == k) for k in keys], np.float64)
  # Two-sample chi-square over the mazes seen at least 40 times in all, pooled otherwise.
  big = (a + b) >= 40
  a = np.append(a[big], a[~big].sum())
  b = np.append(b[big], b[~big].sum())
  ka, kb = np.sqrt(b.sum() / a.sum()), np.sqrt(a.sum() / b.sum())
  stat = np.sum((ka * a - kb * b) ** 2 / (a + b))
  from scipy import stats
  assert stats.chi2.sf(stat, len(a) - 1) > 1e-3


def test_heldout_room_refuses_a_test_set_that_covers_the_distribution():
  heldout = np.asarray(_generate(jax.random.key(0), 4096, 5))[:8]  # 5 x 5 has 4 distinct mazes.
  with pytest.raises(ValueError, match=r"config.eval.num_mazes / config.maze.size.*5x5.*larger config.maze.size"):
    maze_task.check_heldout_room(heldout, 5)
  report = maze_task.check_heldout_room(np.asarray(_generate(jax.random.key(0), 4096, 7))[:2], 7)
  assert report["num_mazes"] == 2 and 0 < report["share_of_distribution"] < 0.1


def test_tfds_train_split_excludes_the_test_split(tmp_path):
  size, num_train, num_test = 7, 256, 64
  train = maze_dataset.load_maze_split(tmp_path, size, "train", num_train=num_train, num_test=num_test)
  test = maze_dataset.load_maze_split(tmp_path, size, "test", num_train=num_train, num_test=num_test)
  assert not _rows(train) & _rows(test)
  unfiltered, _ = maze_dataset.split_mazes(size, "train", num_train)
  assert len(_rows(unfiltered) & _rows(test)) > 0  # Without the exclusion the splits would share mazes.
  kept = np.array([g.tobytes() not in _rows(test) for g in unfiltered.astype(np.int8)])
  np.testing.assert_array_equal(train[kept], unfiltered[kept])  # Only held-out draws were redrawn.


def test_overlap_report_counts_exactly():
  size = 7
  mazes = np.asarray(_generate(jax.random.key(3), 4096, size))[:6]
  bits = np.asarray(maze.passage_bits(jnp.asarray(mazes)))
  sources = {"sft": bits[[0, 0, 1]], "rl": bits[[2, 3]]}
  report = maze_task.overlap_report(sources, mazes[[3, 4]])
  assert report["sft"] == {"drawn": 3, "distinct": len(_rows(mazes[[0, 1]])), "overlap_with_heldout": 0}
  assert report["rl"]["overlap_with_heldout"] == 1
  assert report["all"]["drawn"] == 5
