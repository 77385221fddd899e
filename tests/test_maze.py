"""Tests of the maze task against the plain-Python reference in maze_reference.py.

Every jitted function is built once at module scope and called with a few fixed shapes, so the file compiles
a handful of programs and runs in seconds on a 2-core CPU.
"""

from __future__ import annotations

import collections
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from maxrl_jax.tasks.maze import env as maze

try:  # tests/ on sys.path (pytest's default rootdir insertion) or tests/ as a package
    import maze_reference as ref
except ImportError:  # pragma: no cover
    from tests import maze_reference as ref

_generate = jax.jit(maze.generate_mazes, static_argnums=(1, 2))
_shortest_paths = jax.jit(maze.shortest_path_actions_batch, static_argnums=(1,))
_verify_groups = jax.jit(maze.verify_groups)
_verify_batch = jax.jit(maze.verify_batch)
_encode_prompts = jax.jit(maze.encode_prompts)
_encode_targets = jax.jit(maze.encode_targets, static_argnums=(2,))
_sft_batch = jax.jit(maze.sft_batch, static_argnums=(1, 2, 3))

SMALL = 7  # maze side of the fuzz tests
SMALL_RESPONSE = 24  # >= maze.min_response_length(7) = 18
NUM_SMALL_MAZES = 20000

# Handmade 5 x 5 Prim maze: start (1,1) -> right, right, down, down -> goal (3,3).
#   #####
#   #S..#
#   ###.#
#   #..G#
#   #####
HAND_GRID = np.array(
    [
        [1, 1, 1, 1, 1],
        [1, 0, 0, 0, 1],
        [1, 1, 1, 0, 1],
        [1, 0, 0, 0, 1],
        [1, 1, 1, 1, 1],
    ],
    np.int8,
)
U, D, L, R, DONE, EOS, PAD = maze.UP, maze.DOWN, maze.LEFT, maze.RIGHT, maze.DONE, maze.EOS, maze.PAD


def _as_lists(grid):
    return np.asarray(grid).tolist()


@pytest.fixture(scope="module")
def small_mazes():
    """NUM_SMALL_MAZES Prim mazes of side SMALL, as numpy int8 [M, 7, 7]."""
    return np.asarray(_generate(jax.random.key(7), NUM_SMALL_MAZES, SMALL))


@pytest.fixture(scope="module")
def tiny_mazes():
    """4000 Prim mazes of side 5, as numpy int8 [4000, 5, 5]."""
    return np.asarray(_generate(jax.random.key(5), 4000, 5))


@pytest.fixture(scope="module")
def mazes_by_size(small_mazes, tiny_mazes):
    """64 mazes of each tested side; 5 and 7 reuse the big fixtures, 9 and 17 share one compiled shape each."""
    return {
        5: tiny_mazes[:64],
        7: small_mazes[:64],
        9: np.asarray(_generate(jax.random.key(9), 64, 9)),
        17: np.asarray(_generate(jax.random.key(17), 64, 17)),
    }


@pytest.fixture(scope="module")
def small_paths(small_mazes):
    """BFS actions int32 [2000, max_path_length(7)] and lengths [2000] of the first 2000 small mazes."""
    return tuple(map(np.asarray, _shortest_paths(small_mazes[:2000], None)))


# ----------------------------------------------------------------------------------------------------------
# Constants and sizes.


def test_token_constants_follow_the_spec():
    expected = dict(
        PAD=0, BOS=1, EOS=2, UNK=3, GRID_START=4, GRID_END=5, PATH_START=6, DONE=7, PATH=8, WALL=9, GOAL=10,
        START=11, NEWLINE=12, UP=13, DOWN=14, LEFT=15, RIGHT=16, VOCAB_SIZE=32,
    )
    assert {name: getattr(maze, name) for name in expected} == expected
    assert (ref.DONE, ref.UP, ref.DOWN, ref.LEFT, ref.RIGHT) == (maze.DONE, maze.UP, maze.DOWN, maze.LEFT, maze.RIGHT)


def test_sizes():
    assert maze.prompt_length(17) == 310 == 2 + 17 * 18 + 2
    assert maze.max_path_length(17) == 126
    assert maze.min_response_length(17) == 128 <= maze.RESPONSE_CAP
    assert maze.prompt_length(17) + maze.RESPONSE_CAP <= 512  # the policy's positions
    assert maze.max_path_length(5) == 6


@pytest.mark.parametrize("bad_size", [4, 6, 16, 3, 1, 0, -5, True, 17.0, "17"])
def test_bad_sizes_raise(bad_size):
    with pytest.raises(ValueError, match="maze size"):
        maze.check_maze_size(bad_size)


def test_bad_arguments_raise():
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="odd"):
        maze.generate_mazes(key, 2, 16)
    with pytest.raises(ValueError, match="num_mazes"):
        maze.generate_mazes(key, 0, 7)
    with pytest.raises(ValueError, match="max_response_len"):
        maze.sft_batch(key, 2, 7, maze.min_response_length(7) - 1)
    with pytest.raises(ValueError, match="max_response_len"):
        maze.encode_targets(jnp.zeros((2, 6), jnp.int32), jnp.zeros((2,), jnp.int32), 7)
    with pytest.raises(ValueError, match=r"\[P, N, R\]"):
        maze.verify_groups(jnp.asarray(HAND_GRID)[None], jnp.zeros((1, 4), jnp.int32))
    with pytest.raises(ValueError, match=r"\[B, R\]"):
        maze.verify_batch(jnp.asarray(HAND_GRID)[None], jnp.zeros((2, 4), jnp.int32))
    with pytest.raises(ValueError, match="square"):
        maze.verify(jnp.zeros((5, 7), jnp.int8), jnp.zeros((4,), jnp.int32))
    with pytest.raises(ValueError, match="prompts"):
        maze.decode_prompts(jnp.zeros((1, 33), jnp.int32), 5)


# ----------------------------------------------------------------------------------------------------------
# Generation.


@pytest.mark.parametrize("size", [5, 7, 9, 17])
def test_generated_mazes_are_spanning_trees(size, mazes_by_size):
    grids = mazes_by_size[size]
    assert grids.shape == (64, size, size) and grids.dtype == np.int8
    for grid in grids:
        assert ref.spanning_tree_problems(_as_lists(grid)) == []


def test_keys_determine_mazes(mazes_by_size, tiny_mazes):
    first = mazes_by_size[17]
    again = np.asarray(_generate(jax.random.key(17), 64, 17))
    other = np.asarray(_generate(jax.random.key(2), 64, 17))
    np.testing.assert_array_equal(first, again)
    assert len({grid.tobytes() for grid in first}) == 64
    assert not {grid.tobytes() for grid in first} & {grid.tobytes() for grid in other}
    # Maze i uses fold_in(key, i): a smaller batch is a prefix of a larger one.
    np.testing.assert_array_equal(np.asarray(_generate(jax.random.key(5), 64, 5)), tiny_mazes[:64])


@pytest.mark.parametrize("size", [5, 7])
def test_prim_distribution_matches_exact_enumeration(size, small_mazes, tiny_mazes):
    """Chi-square of the generator's maze frequencies against the exact law of the Prim process."""
    exact = ref.prim_tree_distribution(size)
    grids = small_mazes if size == SMALL else tiny_mazes
    counts = collections.Counter(ref.grid_links(grid) for grid in grids.tolist())
    assert set(counts) <= set(exact)
    trees = sorted(exact, key=lambda tree: exact[tree])
    expected = np.array([float(exact[tree]) * len(grids) for tree in trees])
    observed = np.array([counts[tree] for tree in trees], float)
    # Pool the rarest trees into one bin so that every expected count is at least 5.
    small = np.concatenate([[True], np.cumsum(expected)[:-1] < 5])
    pooled_expected = np.concatenate([[expected[small].sum()], expected[~small]]) if small.any() else expected
    pooled_observed = np.concatenate([[observed[small].sum()], observed[~small]]) if small.any() else observed
    assert scipy.stats.chisquare(pooled_observed, pooled_expected).pvalue > 1e-3


# ----------------------------------------------------------------------------------------------------------
# Shortest paths.


@pytest.mark.parametrize("size", [SMALL, 17])
def test_shortest_paths_match_reference_and_verify(size, small_mazes, small_paths, mazes_by_size):
    if size == SMALL:
        grids, (actions, lengths) = small_mazes[:2000], small_paths
    else:
        grids = mazes_by_size[17]
        actions, lengths = map(np.asarray, _shortest_paths(grids, None))
    assert actions.shape == (len(grids), maze.max_path_length(size)) and actions.dtype == np.int32
    targets, _ = _encode_targets(actions, lengths, maze.min_response_length(size))
    rewards = np.asarray(_verify_groups(grids, targets[:, None, :]))
    np.testing.assert_array_equal(rewards, 1.0)
    for grid, path, length in zip(grids.tolist(), actions.tolist(), lengths.tolist()):
        assert length == ref.bfs_distance(grid)
        assert ref.walk_ends(grid, path[:length]) == (size - 2, size - 2)
        assert set(path[length:]) <= {maze.PAD}


def test_shortest_paths_on_grids_with_cycles():
    """BFS on random non-tree grids (cycles, open areas, unreachable goals) against the reference BFS."""
    rng = np.random.default_rng(0)
    size = SMALL
    grids = (rng.random((256, size, size)) < 0.3).astype(np.int8)
    grids[:, 1, 1] = 0
    grids[:, size - 2, size - 2] = 0
    grids[0] = 0  # completely open grid: Manhattan distance
    grids[1] = 1
    grids[1, 1, 1] = grids[1, size - 2, size - 2] = 0  # goal unreachable
    max_len = size * size
    actions, lengths = map(np.asarray, _shortest_paths(grids, max_len))
    assert lengths[0] == 2 * (size - 3) and lengths[1] == -1
    for grid, path, length in zip(grids.tolist(), actions.tolist(), lengths.tolist()):
        distance = ref.bfs_distance(grid)
        assert length == (-1 if distance is None else distance)
        if distance is not None:
            assert ref.walk_ends(grid, path[:length]) == (size - 2, size - 2)
        assert set(path[max(length, 0):]) <= {maze.PAD}


# ----------------------------------------------------------------------------------------------------------
# Tokenisation and SFT batches.


def test_prompt_layout_by_hand():
    prompt = np.asarray(_encode_prompts(jnp.asarray(HAND_GRID)[None]))[0].tolist()
    W, P, S, G, N = maze.WALL, maze.PATH, maze.START, maze.GOAL, maze.NEWLINE
    assert prompt == [
        maze.BOS, maze.GRID_START,
        W, W, W, W, W, N,
        W, S, P, P, W, N,
        W, W, W, P, W, N,
        W, P, P, G, W, N,
        W, W, W, W, W, N,
        maze.GRID_END, maze.PATH_START,
    ]
    assert len(prompt) == maze.prompt_length(5)


def test_prompt_round_trip_at_paper_size(mazes_by_size):
    grids = mazes_by_size[17]
    prompts = _encode_prompts(grids)
    assert prompts.shape == (64, 310) and prompts.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(maze.decode_prompts(prompts, 17)), grids)
    prompts = np.asarray(prompts)
    assert (prompts < maze.VOCAB_SIZE).all()
    assert (prompts[:, 2:-2].reshape(64, 17, 18)[:, :, 17] == maze.NEWLINE).all()
    assert (prompts[:, 2 + 1 * 18 + 1] == maze.START).all()
    assert (prompts[:, 2 + 15 * 18 + 15] == maze.GOAL).all()


def test_target_round_trip():
    actions = jnp.asarray([[U, D, L, R, U, U], [R, R, PAD, PAD, PAD, PAD], [PAD] * 6], jnp.int32)
    lengths = jnp.asarray([6, 2, 0], jnp.int32)
    tokens, mask = map(np.asarray, _encode_targets(actions, lengths, 10))
    assert tokens.tolist() == [
        [U, D, L, R, U, U, DONE, EOS, PAD, PAD],
        [R, R, DONE, EOS, PAD, PAD, PAD, PAD, PAD, PAD],
        [DONE, EOS, PAD, PAD, PAD, PAD, PAD, PAD, PAD, PAD],
    ]
    assert mask.dtype == np.bool_
    assert mask.sum(1).tolist() == [8, 4, 2] and (mask == (np.arange(10) <= np.asarray(lengths)[:, None] + 1)).all()
    for row, length in zip(tokens.tolist(), lengths.tolist()):
        decoded = row[: row.index(DONE)]
        assert len(decoded) == length and set(decoded) <= set(maze.ACTION_TOKENS)
    assert maze.detokenize(tokens[1, :4]) == ["RIGHT", "RIGHT", "DONE", "<eos>"]


def test_render_maze():
    assert maze.render_maze(HAND_GRID, [R, R, D, DONE, U]) == "#####\n#S**#\n###*#\n#..G#\n#####"


def test_sft_batch_alignment():
    batch_size, response_len = 16, SMALL_RESPONSE
    prompt_len = maze.prompt_length(SMALL)
    batch = _sft_batch(jax.random.key(5), batch_size, SMALL, response_len)
    inputs, loss_mask, grids, lengths = (np.asarray(batch[k]) for k in ("inputs", "loss_mask", "grids", "path_lengths"))
    assert inputs.shape == loss_mask.shape == (batch_size, prompt_len + response_len)
    assert inputs.dtype == np.int32 and loss_mask.dtype == np.bool_
    np.testing.assert_array_equal(np.asarray(maze.decode_prompts(inputs[:, :prompt_len], SMALL)), grids)
    assert (inputs[:, :2] == [maze.BOS, maze.GRID_START]).all()
    assert (inputs[:, prompt_len - 2 : prompt_len] == [maze.GRID_END, maze.PATH_START]).all()
    assert not loss_mask[:, :prompt_len].any()
    # The trainer's view: logits at t predict inputs[t + 1], weighted by loss_mask[t + 1].
    targets, weights = inputs[:, 1:], loss_mask[:, 1:]
    for b in range(batch_size):
        grid, n = grids[b].tolist(), int(lengths[b])
        assert ref.spanning_tree_problems(grid) == [] and n == ref.bfs_distance(grid)
        assert np.flatnonzero(weights[b]).tolist() == list(range(prompt_len - 1, prompt_len + n + 1))
        masked = targets[b][weights[b]].tolist()
        assert masked[n:] == [DONE, EOS] and ref.walk_ends(grid, masked[:n]) == (SMALL - 2, SMALL - 2)
        assert (inputs[b, prompt_len + n + 2 :] == PAD).all()
        assert ref.verify(grid, inputs[b, prompt_len:].tolist()) == 1.0
    # The paper's shapes, without compiling.
    shapes = jax.eval_shape(lambda key: maze.sft_batch(key, 32, 17, maze.RESPONSE_CAP), jax.random.key(0))
    assert shapes["inputs"].shape == shapes["loss_mask"].shape == (32, 490)
    assert shapes["grids"].shape == (32, 17, 17)


# ----------------------------------------------------------------------------------------------------------
# Verifier.

HAND_CASES = [
    ("shortest path", [R, R, D, D, DONE], 1.0),
    ("shortest path, EOS, padding", [R, R, D, D, DONE, EOS, PAD, PAD], 1.0),
    ("back and forth", [R, L, R, R, D, U, D, D, DONE], 1.0),
    ("no DONE (truncated)", [R, R, D, D, EOS], 0.0),
    ("no DONE, only moves", [R, R, D, D], 0.0),
    ("empty response: DONE only", [DONE], 0.0),
    ("only padding", [PAD, PAD, PAD], 0.0),
    ("wall at once", [U, DONE], 0.0),
    ("wall later", [R, R, R, DONE], 0.0),
    ("wall then back on track", [R, D, U, R, D, D, DONE], 0.0),
    ("stops short", [R, R, D, DONE], 0.0),
    ("goal then a wall", [R, R, D, D, D, DONE], 1.0),
    ("goal then moves away", [R, R, D, D, L, L, DONE], 1.0),
    ("goal then many walls", [R, R, D, D, R, R, R, D, D, D, DONE], 1.0),
    ("PAD before DONE", [R, R, D, PAD, D, DONE], 0.0),
    ("EOS before DONE", [R, R, D, D, EOS, DONE], 0.0),
    ("UNK after reaching goal, before DONE", [R, R, D, D, maze.UNK, DONE], 0.0),
    ("reserved token before DONE", [R, 20, R, D, D, DONE], 0.0),
    ("grid token before DONE", [maze.GOAL, R, R, D, D, DONE], 0.0),
    ("junk after DONE is ignored", [R, R, D, D, DONE, maze.UNK, 31, PAD, maze.WALL], 1.0),
    ("moves after DONE are ignored", [R, R, D, DONE, D], 0.0),
    ("a second DONE", [R, R, DONE, D, D, DONE], 0.0),
]


@pytest.fixture(scope="module")
def hand_case_rewards():
    """verify_batch on every hand case at once, padded with PAD to 12 tokens: {name: reward}."""
    responses = np.full((len(HAND_CASES), 12), PAD, np.int32)
    for i, (_, response, _) in enumerate(HAND_CASES):
        responses[i, : len(response)] = response
    grids = np.broadcast_to(HAND_GRID, (len(HAND_CASES), 5, 5))
    rewards = np.asarray(_verify_batch(grids, responses))
    assert rewards.shape == (len(HAND_CASES),) and rewards.dtype == np.float32
    return {name: float(reward) for (name, _, _), reward in zip(HAND_CASES, rewards)}


@pytest.mark.parametrize("name, response, reward", HAND_CASES, ids=[case[0] for case in HAND_CASES])
def test_verifier_hand_cases(name, response, reward, hand_case_rewards):
    assert ref.verify(HAND_GRID.tolist(), response) == reward, "reference disagrees with the task rules"
    assert hand_case_rewards[name] == reward


def test_verify_unpadded_single_response():
    assert float(maze.verify(jnp.asarray(HAND_GRID), jnp.asarray([R, R, D, D, DONE], jnp.int32))) == 1.0
    assert float(maze.verify(jnp.asarray(HAND_GRID), jnp.asarray([R, R, D, D, D], jnp.int32))) == 0.0


def test_verifier_leaving_the_grid():
    grid = HAND_GRID.copy()
    grid[0, 1] = 0  # a hole in the border above the start
    grid[3, 4] = 0  # and one beside the goal
    open_grid = np.zeros((5, 5), np.int8)
    cases = [
        (grid, [U, DONE], 0.0),  # onto the free border cell: not the goal
        (grid, [U, U, DONE], 0.0),  # off the grid
        (grid, [U, U, D, D, R, R, D, D, DONE], 0.0),  # off the grid, then the shortest path
        (grid, [U, D, R, R, D, D, DONE], 1.0),  # through the hole and back
        (grid, [R, R, D, D, R, R, DONE], 1.0),  # goal, then out through the other hole
        (open_grid, [L, L, DONE], 0.0),  # off the grid to the left
        (open_grid, [L, R, R, R, D, D, DONE], 1.0),
        (open_grid, [D, D, D, D, R, R, DONE], 0.0),  # off the bottom before turning to the goal
    ]
    responses = np.full((len(cases), 12), PAD, np.int32)
    for i, (case_grid, response, reward) in enumerate(cases):
        assert ref.verify(case_grid.tolist(), response) == reward
        responses[i, : len(response)] = response
    rewards = np.asarray(_verify_batch(np.stack([case[0] for case in cases]), responses))
    np.testing.assert_array_equal(rewards, [case[2] for case in cases])


_JUNK_TOKENS = np.array([t for t in range(maze.VOCAB_SIZE) if t not in (*maze.ACTION_TOKENS, DONE)])


def _random_walk(rng, grid, steps):
    """Moves that stay on free cells (they may pass the goal)."""
    size = grid.shape[0]
    row, col, moves = 1, 1, []
    for _ in range(steps):
        options = [
            token for token, (dr, dc) in ref.MOVES.items()
            if 0 <= row + dr < size and 0 <= col + dc < size and grid[row + dr, col + dc] == 0
        ]
        if not options:
            break
        token = int(rng.choice(options))
        moves.append(token)
        row, col = row + ref.MOVES[token][0], col + ref.MOVES[token][1]
    return moves


def _fuzz_response(rng, grid, path, length):
    """One random or adversarial response of any length (the caller pads or truncates it)."""
    kind = rng.integers(10)
    actions = list(maze.ACTION_TOKENS)
    if kind == 0:  # the shortest path
        return path + [DONE, EOS]
    if kind == 1:  # i.i.d. tokens, mostly moves
        probs = rng.random(length + 4)
        return [
            int(rng.choice(actions)) if p < 0.85 else DONE if p < 0.93 else int(rng.choice(_JUNK_TOKENS))
            for p in probs
        ]
    if kind == 2:  # a truncated shortest path
        return path[: rng.integers(len(path) + 1)] + [DONE]
    if kind == 3:  # goal, then more moves (often into walls)
        return path + [int(rng.choice(actions)) for _ in range(rng.integers(1, 6))] + [DONE]
    if kind == 4:  # one token of the shortest path replaced
        response = path + [DONE, EOS]
        response[rng.integers(len(response))] = int(rng.integers(maze.VOCAB_SIZE))
        return response
    if kind == 5:  # no DONE at all
        return path + [int(rng.choice([EOS, PAD, U, D, L, R])) for _ in range(rng.integers(0, 4))]
    if kind == 6:  # a wall-avoiding random walk, then DONE
        return _random_walk(rng, grid, int(rng.integers(0, 3 * length + 4))) + [DONE]
    if kind == 7:  # junk after DONE
        return path + [DONE] + [int(rng.integers(maze.VOCAB_SIZE)) for _ in range(rng.integers(1, 8))]
    if kind == 8:  # a junk token inserted somewhere before DONE
        response = path + [DONE]
        response.insert(int(rng.integers(len(response))), int(rng.choice(_JUNK_TOKENS)))
        return response
    # kind 9: a random walk with one random move inserted (may hit a wall), then DONE
    walk = _random_walk(rng, grid, int(rng.integers(1, 2 * length + 4)))
    walk.insert(int(rng.integers(len(walk) + 1)), int(rng.choice(actions)))
    return walk + [DONE]


def _fuzz_responses(rng, grids, paths, num_per_maze, response_len):
    """Responses int32 [P, N, R] (padded with PAD or cut at R, as a sampler's cap would) for grids [P, S, S]."""
    actions, lengths = paths
    responses = np.full((len(grids), num_per_maze, response_len), PAD, np.int32)
    for p, (grid, path, length) in enumerate(zip(grids, actions.tolist(), lengths.tolist())):
        for n in range(num_per_maze):
            response = _fuzz_response(rng, grid, path[:length], length)[:response_len]
            responses[p, n, : len(response)] = response
    return responses


def _check_against_reference(grids, responses):
    rewards = np.asarray(_verify_groups(grids, responses))
    assert rewards.shape == responses.shape[:2] and rewards.dtype == np.float32
    expected = np.array(
        [[ref.verify(grid, response) for response in group] for grid, group in zip(grids.tolist(), responses.tolist())],
        np.float32,
    )
    mismatches = np.argwhere(rewards != expected)
    assert mismatches.size == 0, (
        f"{len(mismatches)} mismatches, first: grid {grids[mismatches[0][0]].tolist()}, "
        f"response {responses[tuple(mismatches[0])].tolist()}, got {rewards[tuple(mismatches[0])]}"
    )
    return expected


def test_verifier_matches_reference_on_random_mazes(small_mazes, small_paths):
    rng = np.random.default_rng(1)
    grids = small_mazes[:2000]
    responses = _fuzz_responses(rng, grids, small_paths, 8, SMALL_RESPONSE)
    expected = _check_against_reference(grids, responses)
    assert 0.2 < expected.mean() < 0.8  # both outcomes well represented


def test_verifier_matches_reference_on_random_grids_with_holes():
    """Non-Prim grids with free border cells, so that walks can leave the grid."""
    rng = np.random.default_rng(2)
    grids = (rng.random((2000, SMALL, SMALL)) < 0.3).astype(np.int8)
    grids[:, 1, 1] = 0
    grids[:, SMALL - 2, SMALL - 2] = 0
    responses = np.full((2000, 8, SMALL_RESPONSE), PAD, np.int32)
    for p, grid in enumerate(grids):
        for n in range(8):
            walk = _random_walk(rng, grid, int(rng.integers(0, SMALL_RESPONSE - 2)))
            walk.insert(int(rng.integers(len(walk) + 1)), int(rng.choice(maze.ACTION_TOKENS)))
            response = (walk + [DONE])[:SMALL_RESPONSE]
            responses[p, n, : len(response)] = response
    expected = _check_against_reference(grids, responses)
    assert expected.sum() >= 10  # random walks rarely find the goal here, but some do
    assert sum(_leaves_grid(response, SMALL) for group in responses.tolist() for response in group) > 50


def _leaves_grid(response, size):
    """Whether the moves before the first DONE ever step outside the size x size grid (walls ignored)."""
    row, col = 1, 1
    for token in response[: response.index(DONE)]:
        row, col = row + ref.MOVES[token][0], col + ref.MOVES[token][1]
        if not (0 <= row < size and 0 <= col < size):
            return True
    return False


def test_verifier_matches_reference_at_paper_shapes(mazes_by_size):
    grids = mazes_by_size[17]
    paths = tuple(map(np.asarray, _shortest_paths(grids, None)))
    responses = _fuzz_responses(np.random.default_rng(3), grids, paths, 16, maze.RESPONSE_CAP)
    expected = _check_against_reference(grids, responses)
    assert 0.2 < expected.mean() < 0.8


# ----------------------------------------------------------------------------------------------------------
# The TFDS dataset (ArrayRecord, no TensorFlow).


def test_tfds_maze_dataset_round_trip(tmp_path):
    from maxrl_jax.tasks.maze import dataset as maze_dataset

    tensorflow_was_loaded = "tensorflow" in sys.modules
    size, num_train, num_test = SMALL, 3, 4
    test_grids = maze_dataset.load_maze_split(tmp_path, size, "test", num_train=num_train, num_test=num_test)
    assert test_grids.shape == (num_test, size, size) and test_grids.dtype == np.int8
    expected, expected_lengths = maze_dataset.split_mazes(size, "test", num_test)
    np.testing.assert_array_equal(test_grids, expected)
    for grid in test_grids:
        assert ref.spanning_tree_problems(grid.tolist()) == []

    arrays = maze_dataset.load_maze_split_arrays(tmp_path, size, "test", 2, num_train=num_train, num_test=num_test)
    np.testing.assert_array_equal(arrays["index"], [0, 1])
    np.testing.assert_array_equal(arrays["grid"], expected[:2])
    np.testing.assert_array_equal(arrays["shortest_path_length"], expected_lengths[:2])
    assert arrays["shortest_path_length"].tolist() == [ref.bfs_distance(g.tolist()) for g in expected[:2]]

    train_grids = maze_dataset.load_maze_split(tmp_path, size, "train", num_train=num_train, num_test=num_test)
    assert train_grids.shape == (num_train, size, size)
    assert not {g.tobytes() for g in train_grids} & {g.tobytes() for g in test_grids}

    files = sorted(tmp_path.glob("maxrl_maze/*/*/*.array_record*"))
    assert len(files) == 2 and "size7_train3_test4" in str(files[0])
    mtimes = [f.stat().st_mtime_ns for f in files]
    maze_dataset.load_maze_split(tmp_path, size, "test", 1, num_train=num_train, num_test=num_test)
    assert [f.stat().st_mtime_ns for f in files] == mtimes  # read back, not rebuilt

    # Maze i does not depend on the split sizes: a smaller config holds a prefix.
    prefix = maze_dataset.load_maze_split(tmp_path, size, "test", num_train=1, num_test=2)
    np.testing.assert_array_equal(prefix, test_grids[:2])

    with pytest.raises(ValueError, match="num_test=5"):
        maze_dataset.load_maze_split(tmp_path, size, "test", 5, num_train=num_train, num_test=num_test)
    with pytest.raises(ValueError, match="split"):
        maze_dataset.load_maze_split(tmp_path, size, "validation", 1)
    with pytest.raises(ValueError, match="num_train"):
        maze_dataset.maze_config(size, num_train=0)
    if not tensorflow_was_loaded:
        assert "tensorflow" not in sys.modules


def test_tfds_registered_configs(tmp_path):
    from maxrl_jax.tasks.maze import dataset as maze_dataset

    names = {config.name for config in maze_dataset.MaxrlMaze.BUILDER_CONFIGS}
    assert maze_dataset.config_name(17, maze_dataset.DEFAULT_NUM_TRAIN, maze_dataset.DEFAULT_NUM_TEST) in names
    for size in (9, 17):  # registered configs are passed by name (TFDS refuses a same-named instance)
        builder = maze_dataset.maze_builder(tmp_path, size, prepare=False)
        assert builder.builder_config.size == size
        assert builder.info.features["grid"].shape == (size, size)
    assert not any(tmp_path.glob("**/*.array_record*"))
