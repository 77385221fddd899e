"""The maze task: random Prim mazes, BFS shortest paths, tokenisation and the verifier.

This is the paper's "infinite data" regime (the paper's maze experiments): every training step draws fresh mazes, so every
function here is a pure, jittable JAX function of explicit PRNG keys and fixed (static) shapes.

Grids. A maze is an int8 array [S, S] with 1 = wall and 0 = free, S odd and >= 5. The start is the cell
(1, 1) and the goal the cell (S-2, S-2). Randomised Prim carves a spanning tree over the odd-coordinate cells,
so the path from start to goal is unique (and therefore also the shortest).

Tokens (vocabulary of 32; ids 17..31 are reserved):

    PAD 0, BOS 1, EOS 2, UNK 3, GRID_START 4, GRID_END 5, PATH_START 6, DONE 7,
    PATH 8 (free cell), WALL 9, GOAL 10, START 11, NEWLINE 12, UP 13, DOWN 14, LEFT 15, RIGHT 16.

Moves: UP = row - 1, DOWN = row + 1, LEFT = col - 1, RIGHT = col + 1.

Prompt ([prompt_length(S)] = 4 + S * (S + 1) tokens, 310 at S = 17):

    BOS GRID_START  row_0 cells NEWLINE  ...  row_{S-1} cells NEWLINE  GRID_END PATH_START

Response: the actions, then DONE, then EOS, padded with PAD. Generation stops at DONE or EOS.

SFT batches (`sft_batch`) put prompt and target in one row `inputs` [B, Lp + R] and carry a bool
`loss_mask` [B, Lp + R] that is True exactly on the target tokens to be predicted (actions, DONE, EOS).
A next-token trainer uses them as

    logits  = model(inputs[:, :-1])        # [B, Lp + R - 1, V]
    targets = inputs[:, 1:]                # [B, Lp + R - 1]
    weights = loss_mask[:, 1:]             # [B, Lp + R - 1]: logits[:, t] predicts inputs[:, t + 1]

so the loss is on response tokens only and the first response token is predicted from PATH_START.

Verifier (`verify`, `verify_batch`, `verify_groups`): reward 1.0 or 0.0 (float32) under the rules of spec
section 4; see `verify` for the exact rules.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# ----------------------------------------------------------------------------------------------------------
# Tokens.

PAD = 0
BOS = 1
EOS = 2
UNK = 3
GRID_START = 4
GRID_END = 5
PATH_START = 6
DONE = 7
PATH = 8
WALL = 9
GOAL = 10
START = 11
NEWLINE = 12
UP = 13
DOWN = 14
LEFT = 15
RIGHT = 16
VOCAB_SIZE = 32

ACTION_TOKENS = (UP, DOWN, LEFT, RIGHT)
TOKEN_NAMES = {
    PAD: "<pad>", BOS: "<bos>", EOS: "<eos>", UNK: "<unk>", GRID_START: "GRID_START", GRID_END: "GRID_END",
    PATH_START: "PATH_START", DONE: "DONE", PATH: "PATH", WALL: "WALL", GOAL: "GOAL", START: "START",
    NEWLINE: "NEWLINE", UP: "UP", DOWN: "DOWN", LEFT: "LEFT", RIGHT: "RIGHT",
}

# Row and column offsets of UP, DOWN, LEFT, RIGHT, in that order (action token = UP + direction index).
_ROW_STEP = (-1, 1, 0, 0)
_COL_STEP = (0, 0, -1, 1)

# The paper's maze size and response cap (a response without DONE within the cap scores 0).
PAPER_MAZE_SIZE = 17
RESPONSE_CAP = 180


# ----------------------------------------------------------------------------------------------------------
# Sizes.


def check_maze_size(size: int) -> int:
    """Returns `size` as an int if it is a valid maze side (odd, >= 5); raises ValueError otherwise."""
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)):
        raise ValueError(f"maze size must be a Python int (odd, >= 5), got {size!r} of type {type(size)}.")
    size = int(size)
    if size < 5:
        raise ValueError(f"maze size must be >= 5 (start (1,1) and goal (S-2,S-2) must differ), got {size}.")
    if size % 2 == 0:
        raise ValueError(
            f"maze size must be odd (Prim carves odd-coordinate cells inside a wall border), got {size}; "
            f"use {size + 1} or {size - 1}."
        )
    return size


def num_odd_cells(size: int) -> int:
    """Number of odd-coordinate cells ((S-1)/2)^2, the vertices of the maze's spanning tree."""
    half = (check_maze_size(size) - 1) // 2
    return half * half


def max_path_length(size: int) -> int:
    """Upper bound on the number of moves of the start-to-goal path of a Prim maze of side `size`.

    A Prim maze has n^2 odd cells and n^2 - 1 carved midpoints (n = (S-1)/2), so 2 n^2 - 1 free cells, and a
    simple path visits each at most once: at most 2 n^2 - 2 moves (126 at S = 17).
    """
    return 2 * num_odd_cells(size) - 2


def prompt_length(size: int) -> int:
    """Prompt tokens for side `size`: BOS GRID_START + S rows of (S cells + NEWLINE) + GRID_END PATH_START."""
    size = check_maze_size(size)
    return 4 + size * (size + 1)


def min_response_length(size: int) -> int:
    """Response length that fits every shortest-path target: max_path_length(size) moves + DONE + EOS."""
    return max_path_length(size) + 2


def _check_token_ids(responses, name: str = "responses") -> None:
    """Checks token ids: an integer dtype always (also under jit), values that fit int32 when concrete.

    The verifier compares ids in their own integer dtype, so an id outside [0, VOCAB_SIZE) is never a move:
    it is an invalid token (reward 0 where it comes before DONE). Ids beyond int32 (e.g. int64 13 + 2**32) are
    refused here: with JAX's default 32-bit types, turning such an array into a JAX array wraps it to int32
    (13 + 2**32 becomes 13, UP) before any comparison can see it. Under jax.jit that conversion happens when
    the argument is passed in, before the verifier runs, so no check inside jit can catch it: pass int32 ids
    (the sampler's), or enable 64-bit types, under which wide ids reach the comparison intact and score 0.
    """
    dtype = np.dtype(responses.dtype)
    if not np.issubdtype(dtype, np.integer):
        raise ValueError(f"{name} must hold integer token ids, got dtype {dtype}; convert it with "
                         ".astype(int32) after checking that the values are whole numbers.")
    if isinstance(responses, jax.core.Tracer):
        return
    values = np.asarray(responses)
    if values.size:
        info = np.iinfo(np.int32)
        outside = values[(values < info.min) | (values > info.max)]
        if outside.size:
            raise ValueError(f"{name} holds token ids outside the int32 range (e.g. {int(outside[0])}), which JAX "
                             f"would wrap to other ids; token ids are in [0, {VOCAB_SIZE}), fix the tokens or their "
                             "dtype before verifying.")


def _check_grids(grids: jax.Array, rank: int, name: str = "grids") -> int:
    """Checks a grid array's rank and square odd side; returns the side S."""
    if grids.ndim != rank:
        want = "[S, S]" if rank == 2 else "[" + ", ".join(["..."] * (rank - 2)) + ", S, S]"
        raise ValueError(f"{name} must have rank {rank} ({want}), got shape {grids.shape}.")
    if grids.shape[-1] != grids.shape[-2]:
        raise ValueError(f"{name} must be square in its last two axes, got shape {grids.shape}.")
    return check_maze_size(grids.shape[-1])


# ----------------------------------------------------------------------------------------------------------
# Generation: randomised Prim.


def _uniform_index_of_true(random_bits: jax.Array, mask: jax.Array) -> jax.Array:
    """A random index among the True entries of the 1-D bool `mask` (at least one), from uint32 `random_bits`.

    The rank is `random_bits % count`: uniform up to a modulo bias below count / 2^32 (< 2e-8 at S = 17).
    """
    count = jnp.maximum(jnp.sum(mask, dtype=jnp.uint32), 1)
    rank = (random_bits % count).astype(jnp.int32)
    # The index of the (rank + 1)-th True entry.
    return jnp.argmax(jnp.cumsum(mask, dtype=jnp.int32) > rank).astype(jnp.int32)


def generate_maze(rng: jax.Array, size: int) -> jax.Array:
    """One randomised-Prim maze: int8 [size, size], 1 = wall, 0 = free.

    Rule (the paper's maze task). Start all walls. The cells are the odd-coordinate positions (2i+1, 2j+1),
    i, j in [0, n), n = (S-1)/2. Carve the start (1, 1); the frontier is the set of uncarved cells two steps
    away from a carved cell. Repeat n^2 - 1 times: take a uniformly random frontier cell, connect it to a
    uniformly random already-carved cell two steps away (carve the midpoint and the cell), and add its
    uncarved two-step neighbours to the frontier. The frontier is never empty before every cell is carved,
    so the loop is a `lax.scan` of exactly n^2 - 1 steps and the result is a spanning tree over the n^2 cells.
    The two uniform choices of each step come from `jax.random.bits(rng, (n^2 - 1, 2))` (see
    `_uniform_index_of_true`); the law of the output is checked against an exact enumeration in the tests.

    Args:
      rng: a PRNG key (consumed).
      size: the odd side S >= 5 (static).

    Returns:
      int8 [S, S] grid.
    """
    size = check_maze_size(size)
    n = (size - 1) // 2
    row_step = jnp.asarray(_ROW_STEP, jnp.int32)
    col_step = jnp.asarray(_COL_STEP, jnp.int32)
    # Everything below is elementwise against index grids (no scatter or gather), which keeps the vmapped
    # loop cheap to compile and run.
    cell_index = jnp.arange(n * n, dtype=jnp.int32)
    cell_rows, cell_cols = cell_index // n, cell_index % n  # [n*n]
    grid_rows = jnp.arange(size, dtype=jnp.int32)[:, None]  # [S, 1]
    grid_cols = jnp.arange(size, dtype=jnp.int32)[None, :]  # [1, S]

    grid = jnp.ones((size, size), jnp.int8).at[1, 1].set(0)
    carved = cell_index == 0  # [n*n]: the start, cell (0, 0)
    frontier = (cell_rows + cell_cols) == 1  # its two-step neighbours (0, 1) and (1, 0)
    # Two uint32 draws per carving step (frontier cell, carved neighbour), all drawn up front.
    random_bits = jax.random.bits(rng, (n * n - 1, 2), jnp.uint32)

    def carve_one(state, bits):
        grid, carved, frontier = state
        flat = _uniform_index_of_true(bits[0], frontier)
        cell_row, cell_col = flat // n, flat % n
        nbr_rows, nbr_cols = cell_row + row_step, cell_col + col_step  # [4]
        nbr_carved = jnp.any(
            carved[None, :] & (cell_rows[None, :] == nbr_rows[:, None]) & (cell_cols[None, :] == nbr_cols[:, None]),
            axis=1,
        )  # [4]; out-of-range neighbours match no cell
        direction = jnp.arange(4) == _uniform_index_of_true(bits[1], nbr_carved)  # one-hot [4]
        grid_row, grid_col = 2 * cell_row + 1, 2 * cell_col + 1
        mid_row = grid_row + jnp.sum(jnp.where(direction, row_step, 0))
        mid_col = grid_col + jnp.sum(jnp.where(direction, col_step, 0))
        carve = ((grid_rows == grid_row) & (grid_cols == grid_col)) | ((grid_rows == mid_row) & (grid_cols == mid_col))
        grid = jnp.where(carve, jnp.int8(0), grid)
        carved = carved | (cell_index == flat)
        adjacent = (jnp.abs(cell_rows - cell_row) + jnp.abs(cell_cols - cell_col)) == 1
        frontier = (frontier | adjacent) & ~carved
        return (grid, carved, frontier), None

    (grid, _, _), _ = jax.lax.scan(carve_one, (grid, carved, frontier), random_bits)
    return grid


def generate_mazes_from_keys(keys: jax.Array, size: int) -> jax.Array:
    """`generate_maze` vmapped over keys [M] (or raw keys [M, 2]): int8 [M, S, S]. Maze i depends only on keys[i]."""
    return jax.vmap(lambda key: generate_maze(key, size))(keys)


def generate_mazes(rng: jax.Array, num_mazes: int, size: int) -> jax.Array:
    """`num_mazes` independent randomised-Prim mazes: int8 [num_mazes, size, size], 1 = wall, 0 = free.

    Jittable with `num_mazes` and `size` static; maze i uses the key `fold_in(rng, i)`, so the first m mazes do
    not depend on `num_mazes`. See `generate_maze` for the rule.
    """
    size = check_maze_size(size)
    if isinstance(num_mazes, bool) or not isinstance(num_mazes, (int, np.integer)) or num_mazes < 1:
        raise ValueError(f"num_mazes must be a positive Python int, got {num_mazes!r}.")
    keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(int(num_mazes), dtype=jnp.uint32))
    return generate_mazes_from_keys(keys, size)


# ----------------------------------------------------------------------------------------------------------
# Held-out mazes: identities and exclusion from training draws.

# Redraws of one training maze that landed in the held-out set, before giving up (`draw_training_mazes`).
# `heldout_mass` bounds the chance of giving up: a trainer refuses a held-out set whose share of the maze
# distribution is so large that (share)^MAX_REDRAWS is not negligible.
MAX_REDRAWS = 32


def num_passages(size: int) -> int:
    """Number of wall positions between adjacent odd cells, 2 n (n - 1) for n = (S-1)/2 (112 at S = 17).

    A Prim maze is a spanning tree over the n x n odd cells; which of these positions are carved determines
    it completely (every other cell of the grid is a wall or an odd cell, the same in every maze).
    """
    half = (check_maze_size(size) - 1) // 2
    return 2 * half * (half - 1)


def passage_bits(grids: jax.Array) -> jax.Array:
    """The maze's identity: bool [..., 2 n (n - 1)], True where a passage between two odd cells is carved.

    Horizontal passages (rows 2i+1, columns 2j+2) come first, then vertical ones (rows 2i+2, columns 2j+1),
    row-major. Two grids of the same side are the same maze exactly when their passage bits are equal.
    """
    size = grids.shape[-1]
    _check_grids(grids.reshape((-1, size, size)), 3)
    horizontal = grids[..., 1::2, 2:-1:2]  # [..., n, n - 1]
    vertical = grids[..., 2:-1:2, 1::2]  # [..., n - 1, n]
    flat = jnp.concatenate(
        [horizontal.reshape(grids.shape[:-2] + (-1,)), vertical.reshape(grids.shape[:-2] + (-1,))], axis=-1)
    return flat == 0


def _mix32(x: jax.Array) -> jax.Array:
    """A bijection of uint32 (the 32-bit finaliser of MurmurHash3)."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * jnp.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def maze_hashes(grids: jax.Array) -> jax.Array:
    """A uint32 hash of each maze's passage bits: uint32 [...] for grids [..., S, S] (jittable).

    Equal mazes always have equal hashes, so a maze whose hash is not in a set of hashes is certainly not in
    the corresponding set of mazes; that is all the exclusion of held-out mazes relies on. Up to 32 passages
    (S <= 9) the hash is injective (the passage bits packed into one word, then a bijection), so there are no
    false matches; beyond that two different mazes share a hash with probability about 2^-32.
    """
    bits = passage_bits(grids).astype(jnp.uint32)  # [..., E]
    num_bits = bits.shape[-1]
    num_words = max(1, -(-num_bits // 32))
    bits = jnp.pad(bits, [(0, 0)] * (bits.ndim - 1) + [(0, 32 * num_words - num_bits)])
    words = bits.reshape(bits.shape[:-1] + (num_words, 32))
    words = jnp.sum(words << jnp.arange(32, dtype=jnp.uint32), axis=-1, dtype=jnp.uint32)  # [..., W]
    if num_words == 1:
        return _mix32(words[..., 0])
    hashed = jnp.full(words.shape[:-1], num_bits, jnp.uint32)
    for w in range(num_words):
        hashed = _mix32(hashed * jnp.uint32(0x9E3779B1) ^ _mix32(words[..., w] + jnp.uint32(w)))
    return hashed


def hash_table(grids) -> np.ndarray:
    """Sorted unique uint32 hashes of a set of mazes [M, S, S]: the table `draw_training_mazes` excludes."""
    return np.unique(np.asarray(maze_hashes(jnp.asarray(grids))))


def in_table(hashes: jax.Array, table: jax.Array) -> jax.Array:
    """bool, same shape as `hashes`: whether each hash is in the sorted uint32 `table` [T] (T may be 0)."""
    if table.shape[0] == 0:
        return jnp.zeros(hashes.shape, jnp.bool_)
    index = jnp.clip(jnp.searchsorted(table, hashes), 0, table.shape[0] - 1)
    return table[index] == hashes


def draw_training_mazes(rng: jax.Array, num_mazes: int, size: int, excluded: jax.Array | None = None
                        ) -> tuple[jax.Array, jax.Array]:
    """Fresh training mazes that are never held-out mazes: (int8 [num_mazes, S, S], int32 redraws []).

    Maze i is first drawn exactly as `generate_mazes(rng, num_mazes, size)[i]` (key `fold_in(rng, i)`); while
    its hash is in `excluded` (a sorted uint32 table from `hash_table`), it is drawn again from
    `fold_in(fold_in(rng, i), attempt)`, at most MAX_REDRAWS times (a bounded `lax.while_loop`). The result
    is therefore the Prim law conditioned on not being held out, and equal to `generate_mazes` whenever no
    draw hits the table. `redraws` counts the redraws made. If a maze is still held out after MAX_REDRAWS
    redraws (probability share^MAX_REDRAWS, which trainers keep negligible by refusing large shares, see
    `heldout_mass`), it is returned as drawn; `count_in_table` on the output detects it.

    Jittable with `num_mazes` and `size` static.
    """
    if isinstance(num_mazes, bool) or not isinstance(num_mazes, (int, np.integer)) or num_mazes < 1:
        raise ValueError(f"num_mazes must be a positive Python int, got {num_mazes!r}.")
    maze_keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(int(num_mazes), dtype=jnp.uint32))
    return draw_training_mazes_from_keys(maze_keys, size, excluded)


def draw_training_mazes_from_keys(maze_keys: jax.Array, size: int, excluded: jax.Array | None = None
                                  ) -> tuple[jax.Array, jax.Array]:
    """`draw_training_mazes` with maze i drawn from `maze_keys[i]` (redraws from `fold_in(maze_keys[i], a)`)."""
    grids = generate_mazes_from_keys(maze_keys, size)
    if excluded is None or excluded.shape[0] == 0:
        return grids, jnp.zeros((), jnp.int32)

    def held_out(g):
        return in_table(maze_hashes(g), excluded)

    def cond(state):
        _, hit, attempt, _ = state
        return jnp.any(hit) & (attempt <= MAX_REDRAWS)

    def body(state):
        grids, hit, attempt, redraws = state
        keys = jax.vmap(lambda key: jax.random.fold_in(key, attempt))(maze_keys)
        fresh = generate_mazes_from_keys(keys, size)
        grids = jnp.where(hit[:, None, None], fresh, grids)
        redraws = redraws + jnp.sum(hit, dtype=jnp.int32)
        return grids, hit & held_out(fresh), attempt + 1, redraws

    grids, _, _, redraws = jax.lax.while_loop(
        cond, body, (grids, held_out(grids), jnp.uint32(1), jnp.zeros((), jnp.int32)))
    return grids, redraws


def count_in_table(grids: jax.Array, table: jax.Array) -> jax.Array:
    """int32: how many of the mazes [M, S, S] have their hash in the sorted table (0 for a clean draw)."""
    return jnp.sum(in_table(maze_hashes(grids), table), dtype=jnp.int32)


def heldout_mass(heldout_grids, size: int, num_draws: int = 4096, seed: int = 0) -> float:
    """Share of the Prim law taken by a held-out set: the fraction of `num_draws` fresh mazes in it."""
    table = jnp.asarray(hash_table(heldout_grids))
    draws = jax.jit(generate_mazes, static_argnums=(1, 2))(jax.random.key(seed), num_draws, size)
    return float(count_in_table(draws, table)) / num_draws


# ----------------------------------------------------------------------------------------------------------
# Shortest paths.


def bfs_distances(grid: jax.Array) -> jax.Array:
    """BFS distance (in moves) from every free cell to the goal; int32 [S, S], walls and unreachable = S*S.

    Computed by relaxing dist <- min(dist, 1 + min over the 4 neighbours) on free cells until nothing changes
    (a `lax.while_loop` of at most S*S sweeps; the distance to the goal never exceeds S*S - 1).
    """
    size = _check_grids(grid, 2, "grid")
    unreachable = size * size
    free = grid == 0
    dist = jnp.full((size, size), unreachable, jnp.int32).at[size - 2, size - 2].set(0)
    dist = jnp.where(free, dist, unreachable)

    def relax(state):
        dist, _, sweeps = state
        padded = jnp.pad(dist, 1, constant_values=unreachable)
        nbr_min = jnp.minimum(
            jnp.minimum(padded[:-2, 1:-1], padded[2:, 1:-1]), jnp.minimum(padded[1:-1, :-2], padded[1:-1, 2:])
        )
        new_dist = jnp.where(free, jnp.minimum(dist, jnp.minimum(nbr_min + 1, unreachable)), unreachable)
        return new_dist, jnp.any(new_dist != dist), sweeps + 1

    dist, _, _ = jax.lax.while_loop(
        lambda state: state[1] & (state[2] < unreachable), relax, (dist, jnp.bool_(True), jnp.int32(0))
    )
    return dist


def shortest_path_actions(grid: jax.Array, max_path_len: int | None = None) -> tuple[jax.Array, jax.Array]:
    """A BFS shortest path from the start (1, 1) to the goal (S-2, S-2) as action tokens.

    The path is a greedy walk from the start that always steps to a neighbour one move closer to the goal
    (`bfs_distances`); ties, which cannot occur in a Prim maze, go to the first of UP, DOWN, LEFT, RIGHT.

    Args:
      grid: int [S, S], nonzero = wall.
      max_path_len: static length of the action buffer; default `max_path_length(S)`, which bounds every
        Prim maze. A grid whose shortest path is longer gets only its first `max_path_len` moves.

    Returns:
      actions: int32 [max_path_len], UP/DOWN/LEFT/RIGHT tokens, then PAD.
      length: int32 scalar, the number of moves of the shortest path (-1 and all PAD if the goal is
        unreachable or the start is a wall).
    """
    size = _check_grids(grid, 2, "grid")
    if max_path_len is None:
        max_path_len = max_path_length(size)
    unreachable = size * size
    dist = bfs_distances(grid)
    padded = jnp.pad(dist, 1, constant_values=unreachable)
    row_step = jnp.asarray(_ROW_STEP, jnp.int32)
    col_step = jnp.asarray(_COL_STEP, jnp.int32)

    def walk(position, _):
        row, col = position
        here = dist[row, col]
        stop = (here == 0) | (here >= unreachable)
        nbr_dist = padded[row + 1 + row_step, col + 1 + col_step]  # [4]
        direction = jnp.argmax(nbr_dist == here - 1)
        action = jnp.where(stop, PAD, UP + direction).astype(jnp.int32)
        new_position = (
            jnp.where(stop, row, row + row_step[direction]),
            jnp.where(stop, col, col + col_step[direction]),
        )
        return new_position, action

    _, actions = jax.lax.scan(walk, (jnp.int32(1), jnp.int32(1)), None, length=max_path_len)
    start_dist = dist[1, 1]
    length = jnp.where(start_dist >= unreachable, -1, start_dist).astype(jnp.int32)
    return actions, length


def shortest_path_actions_batch(grids: jax.Array, max_path_len: int | None = None) -> tuple[jax.Array, jax.Array]:
    """`shortest_path_actions` over grids [B, S, S]: actions int32 [B, max_path_len], lengths int32 [B]."""
    _check_grids(grids, 3)
    return jax.vmap(lambda grid: shortest_path_actions(grid, max_path_len))(grids)


# ----------------------------------------------------------------------------------------------------------
# Tokenisation.


def grid_cell_tokens(grids: jax.Array) -> jax.Array:
    """Cell tokens int32 [..., S, S]: WALL for walls, PATH for free cells, START at (1,1), GOAL at (S-2,S-2)."""
    if grids.ndim < 2:
        raise ValueError(f"grids must have shape [..., S, S], got {grids.shape}.")
    size = _check_grids(grids, grids.ndim)
    cells = jnp.where(grids != 0, WALL, PATH).astype(jnp.int32)
    cells = cells.at[..., 1, 1].set(START)
    return cells.at[..., size - 2, size - 2].set(GOAL)


def encode_prompts(grids: jax.Array) -> jax.Array:
    """Prompt tokens int32 [B, prompt_length(S)] for grids [B, S, S] (nonzero = wall).

    Layout: BOS GRID_START, then for each row its S cell tokens (`grid_cell_tokens`) and NEWLINE, then
    GRID_END PATH_START. 4 + S (S + 1) tokens: 310 at S = 17.
    """
    size = _check_grids(grids, 3)
    batch = grids.shape[0]
    cells = grid_cell_tokens(grids)  # [B, S, S]
    rows = jnp.concatenate([cells, jnp.full((batch, size, 1), NEWLINE, jnp.int32)], axis=2)
    prefix = jnp.broadcast_to(jnp.asarray([BOS, GRID_START], jnp.int32), (batch, 2))
    suffix = jnp.broadcast_to(jnp.asarray([GRID_END, PATH_START], jnp.int32), (batch, 2))
    return jnp.concatenate([prefix, rows.reshape(batch, size * (size + 1)), suffix], axis=1)


def decode_prompts(prompts: jax.Array, size: int) -> jax.Array:
    """Inverse of `encode_prompts`: prompts int [B, prompt_length(size)] -> grids int8 [B, S, S] (1 = wall).

    Only the cell tokens are read (WALL -> 1, anything else -> 0); the frame tokens are not checked here.
    """
    size = check_maze_size(size)
    if prompts.ndim != 2 or prompts.shape[1] != prompt_length(size):
        raise ValueError(
            f"prompts must have shape [B, {prompt_length(size)}] for size {size}, got {prompts.shape}."
        )
    rows = prompts[:, 2:-2].reshape(prompts.shape[0], size, size + 1)
    return (rows[:, :, :size] == WALL).astype(jnp.int8)


def encode_targets(
    actions: jax.Array, lengths: jax.Array, max_response_len: int
) -> tuple[jax.Array, jax.Array]:
    """Response targets: the first `lengths[b]` actions, DONE, EOS, then PAD.

    Args:
      actions: int [B, A] action tokens (entries at positions >= lengths[b] are ignored).
      lengths: int [B] number of moves, 0 <= lengths[b] <= A.
      max_response_len: static R >= A + 2, so that no target is truncated.

    Returns:
      tokens: int32 [B, R].
      loss_mask: bool [B, R], True on the actions, DONE and EOS (positions t <= lengths[b] + 1).
    """
    if actions.ndim != 2 or lengths.shape != actions.shape[:1]:
        raise ValueError(
            f"actions must be [B, A] and lengths [B], got actions {actions.shape} and lengths {lengths.shape}."
        )
    num_actions = actions.shape[1]
    if max_response_len < num_actions + 2:
        raise ValueError(
            f"max_response_len={max_response_len} cannot hold {num_actions} actions + DONE + EOS; "
            f"use max_response_len >= {num_actions + 2}."
        )
    positions = jnp.arange(max_response_len, dtype=jnp.int32)[None, :]
    lengths = lengths.astype(jnp.int32)[:, None]
    padded_actions = jnp.pad(actions.astype(jnp.int32), ((0, 0), (0, max_response_len - num_actions)))
    tokens = jnp.where(positions < lengths, padded_actions, PAD)
    tokens = jnp.where(positions == lengths, DONE, tokens)
    tokens = jnp.where(positions == lengths + 1, EOS, tokens)
    return tokens.astype(jnp.int32), positions <= lengths + 1


def sft_batch(rng: jax.Array, batch_size: int, size: int, max_response_len: int,
              excluded: jax.Array | None = None) -> dict[str, jax.Array]:
    """A supervised batch of fresh mazes with their BFS shortest paths (jittable; the ints are static).

    Args:
      rng: PRNG key (consumed).
      batch_size: B.
      size: odd maze side S >= 5.
      max_response_len: R >= min_response_length(S) (128 at S = 17; the paper's cap is 180).
      excluded: optional sorted uint32 hash table of held-out mazes (`hash_table`) never to train on; the
        mazes come from `draw_training_mazes` (equal to `generate_mazes` when no draw is held out).

    Returns a dict:
      inputs: int32 [B, Lp + R], the prompt (Lp = prompt_length(S)) followed by the target response
        (actions, DONE, EOS, PAD...).
      loss_mask: bool [B, Lp + R], True exactly on the response's actions, DONE and EOS.
      grids: int8 [B, S, S], the mazes.
      path_lengths: int32 [B], moves of each shortest path.

    Alignment: `inputs[:, t]` is predicted from the logits at position t - 1, so a trainer uses
    `logits = model(inputs[:, :-1])`, `targets = inputs[:, 1:]` and `weights = loss_mask[:, 1:]`.
    """
    if max_response_len < min_response_length(size):
        raise ValueError(
            f"max_response_len={max_response_len} is too short for size {size}: the longest Prim path needs "
            f"{min_response_length(size)} tokens (moves + DONE + EOS); raise it."
        )
    grids, _ = draw_training_mazes(rng, batch_size, size, excluded)
    actions, lengths = shortest_path_actions_batch(grids)
    prompts = encode_prompts(grids)
    targets, target_mask = encode_targets(actions, lengths, max_response_len)
    return {
        "inputs": jnp.concatenate([prompts, targets], axis=1),
        "loss_mask": jnp.concatenate([jnp.zeros(prompts.shape, jnp.bool_), target_mask], axis=1),
        "grids": grids,
        "path_lengths": lengths,
    }


# ----------------------------------------------------------------------------------------------------------
# Verifier.


def verify(grid: jax.Array, response: jax.Array) -> jax.Array:
    """Reward of one response on one maze: float32 scalar, 1.0 or 0.0.

    Args:
      grid: int [S, S], nonzero = wall; start (1, 1), goal (S-2, S-2).
      response: int [R], the sampled tokens after PATH_START (any R >= 1; the sampler's cap, 180 in the paper).
        Any integer dtype (others raise a ValueError, also under jit); ids are compared in that dtype, so an
        id outside [0, VOCAB_SIZE) is an invalid token, never a move. A concrete array with ids beyond int32
        raises a ValueError, since JAX's default 32-bit types would wrap them (int64 13 + 2**32 to 13, UP).
        Under jax.jit that wrap happens when the argument is passed in, before any check can see it: pass
        int32 ids (as the sampler does), or enable 64-bit types, under which such ids arrive intact and
        score 0.

    Rules (the paper's maze task), applied in this order:
      1. No DONE anywhere in the response (including truncation at the cap) -> 0.
      2. Any token before the first DONE that is not UP/DOWN/LEFT/RIGHT (PAD, EOS, grid tokens, ...) -> 0.
      3. Walk from the start through the actions before the first DONE: a move that leaves the grid or enters
         a wall -> 0 at once; a move that enters the goal -> 1 at once (the remaining moves, even into walls,
         are ignored). Otherwise the reward is 1 iff the walk ends on the goal (never, as start != goal).
      Tokens after the first DONE are ignored.
    """
    size = _check_grids(grid, 2, "grid")
    if response.ndim != 1:
        raise ValueError(f"response must have shape [R], got {response.shape}; use verify_batch/verify_groups.")
    _check_token_ids(response, "response")
    grid = jnp.asarray(grid)
    response = jnp.asarray(response)
    goal = size - 2
    is_wall = grid != 0
    row_step = jnp.asarray(_ROW_STEP, jnp.int32)
    col_step = jnp.asarray(_COL_STEP, jnp.int32)

    def read(state, token):
        row, col, done_seen, junk, crashed, reached = state
        before_done = ~done_seen
        is_done = token == DONE
        # Compared in the ids' own dtype (no cast that could wrap): only the ids UP..RIGHT are moves.
        is_action = (token >= UP) & (token <= RIGHT)
        junk = junk | (before_done & ~is_done & ~is_action)
        moving = before_done & is_action & ~crashed & ~reached
        direction = (jnp.clip(token, UP, RIGHT) - UP).astype(jnp.int32)
        new_row, new_col = row + row_step[direction], col + col_step[direction]
        inside = (new_row >= 0) & (new_row < size) & (new_col >= 0) & (new_col < size)
        blocked = ~inside | is_wall[jnp.clip(new_row, 0, size - 1), jnp.clip(new_col, 0, size - 1)]
        crashed = crashed | (moving & blocked)
        stepped = moving & ~blocked
        row, col = jnp.where(stepped, new_row, row), jnp.where(stepped, new_col, col)
        reached = reached | (stepped & (row == goal) & (col == goal))
        return (row, col, done_seen | is_done, junk, crashed, reached), None

    false = jnp.bool_(False)
    init = (jnp.int32(1), jnp.int32(1), false, false, false, false)
    (row, col, done_seen, junk, crashed, reached), _ = jax.lax.scan(read, init, response)
    ends_on_goal = ~crashed & (row == goal) & (col == goal)
    return (done_seen & ~junk & (reached | ends_on_goal)).astype(jnp.float32)


def verify_batch(grids: jax.Array, responses: jax.Array) -> jax.Array:
    """`verify` over a batch: grids int [B, S, S], responses int [B, R] -> rewards float32 [B]."""
    _check_grids(grids, 3)
    if responses.ndim != 2 or responses.shape[0] != grids.shape[0]:
        raise ValueError(f"responses must be [B, R] with B = {grids.shape[0]}, got {responses.shape}.")
    _check_token_ids(responses)
    return jax.vmap(verify)(grids, responses)


def verify_groups(grids: jax.Array, responses: jax.Array) -> jax.Array:
    """`verify` over groups: grids int [P, S, S], responses int [P, N, R] (N rollouts per maze) -> float32 [P, N]."""
    _check_grids(grids, 3)
    if responses.ndim != 3 or responses.shape[0] != grids.shape[0]:
        raise ValueError(f"responses must be [P, N, R] with P = {grids.shape[0]}, got {responses.shape}.")
    _check_token_ids(responses)
    return jax.vmap(lambda grid, group: jax.vmap(lambda response: verify(grid, response))(group))(grids, responses)


# ----------------------------------------------------------------------------------------------------------
# Debugging helpers (host side, numpy).


def render_maze(grid, actions=None) -> str:
    """A text picture of a grid ('#' wall, '.' free, 'S' start, 'G' goal), with the cells a walk visits marked
    '*' (the walk stops at the first DONE/EOS/PAD token or at a wall or the border). Host-side, for logs."""
    grid = np.asarray(grid)
    size = grid.shape[0]
    picture = [["#" if cell else "." for cell in row] for row in grid]
    if actions is not None:
        row, col = 1, 1
        for token in np.asarray(actions).tolist():
            if token not in ACTION_TOKENS:
                break
            direction = token - UP
            row, col = row + _ROW_STEP[direction], col + _COL_STEP[direction]
            if not (0 <= row < size and 0 <= col < size) or grid[row, col]:
                break
            picture[row][col] = "*"
    picture[1][1] = "S"
    picture[size - 2][size - 2] = "G"
    return "\n".join("".join(row) for row in picture)


def detokenize(tokens) -> list[str]:
    """Token names for a 1-D sequence of ids (reserved ids -> '<reserved:i>'). Host-side, for logs."""
    return [TOKEN_NAMES.get(int(token), f"<reserved:{int(token)}>") for token in np.asarray(tokens).reshape(-1)]
