"""Plain-Python reference for the maze task, written from the paper's task description and independent of the JAX code.

Grids are lists of lists (or anything indexable as grid[r][c]) with 1 = wall and 0 = free; start (1, 1),
goal (S-2, S-2). Token ids are written out here from the task description rather than imported, so a wrong constant in
`maxrl_jax.tasks.maze` is caught by the tests.
"""

from __future__ import annotations

import collections
import fractions

DONE = 7
UP, DOWN, LEFT, RIGHT = 13, 14, 15, 16
MOVES = {UP: (-1, 0), DOWN: (1, 0), LEFT: (0, -1), RIGHT: (0, 1)}


def _neighbours(grid, row, col):
    size = len(grid)
    for d_row, d_col in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        r, c = row + d_row, col + d_col
        if 0 <= r < size and 0 <= c < size:
            yield r, c


def spanning_tree_problems(grid) -> list[str]:
    """Reasons why `grid` is not a Prim maze (a spanning tree over the odd cells); [] if it is one."""
    size = len(grid)
    problems = []
    if any(len(row) != size for row in grid):
        return ["grid is not square"]
    if any(grid[r][c] not in (0, 1) for r in range(size) for c in range(size)):
        problems.append("cells other than 0/1")
    border = [(r, c) for r in range(size) for c in range(size) if r in (0, size - 1) or c in (0, size - 1)]
    if any(grid[r][c] != 1 for r, c in border):
        problems.append("border is not all walls")
    if any(grid[r][c] != 0 for r in range(1, size, 2) for c in range(1, size, 2)):
        problems.append("an odd cell is not carved")
    if any(grid[r][c] != 1 for r in range(0, size, 2) for c in range(0, size, 2)):
        problems.append("an even-even cell is carved")
    free = {(r, c) for r in range(size) for c in range(size) if grid[r][c] == 0}
    edges = sum(1 for r, c in free for nr, nc in ((r + 1, c), (r, c + 1)) if (nr, nc) in free)
    if edges != len(free) - 1:
        problems.append(f"{edges} edges between {len(free)} free cells (a tree has {len(free) - 1})")
    seen, queue = {(1, 1)}, collections.deque([(1, 1)])
    while queue:
        cell = queue.popleft()
        for nbr in _neighbours(grid, *cell):
            if nbr in free and nbr not in seen:
                seen.add(nbr)
                queue.append(nbr)
    if seen != free:
        problems.append(f"{len(free) - len(seen)} free cells unreachable from the start")
    return problems


def bfs_distance(grid):
    """Shortest number of moves from (1, 1) to (S-2, S-2) through free cells, or None if there is no path."""
    size = len(grid)
    start, goal = (1, 1), (size - 2, size - 2)
    if grid[1][1] != 0:
        return None
    dist = {start: 0}
    queue = collections.deque([start])
    while queue:
        cell = queue.popleft()
        if cell == goal:
            return dist[cell]
        for nbr in _neighbours(grid, *cell):
            if grid[nbr[0]][nbr[1]] == 0 and nbr not in dist:
                dist[nbr] = dist[cell] + 1
                queue.append(nbr)
    return None


def verify(grid, response) -> float:
    """The task's verifier, rule by rule."""
    size = len(grid)
    goal = (size - 2, size - 2)
    response = [int(token) for token in response]
    if DONE not in response:
        return 0.0  # no DONE (or truncated at the cap)
    body = response[: response.index(DONE)]
    if any(token not in MOVES for token in body):
        return 0.0  # a non-action token before DONE
    row, col = 1, 1
    for token in body:
        row, col = row + MOVES[token][0], col + MOVES[token][1]
        if not (0 <= row < size and 0 <= col < size):
            return 0.0  # left the grid
        if grid[row][col] != 0:
            return 0.0  # entered a wall
        if (row, col) == goal:
            return 1.0  # entered the goal: later moves are ignored
    return 1.0 if (row, col) == goal else 0.0


def walk_ends(grid, actions):
    """Cell reached by following `actions` from the start, or None as soon as a move hits a wall or the border."""
    size = len(grid)
    row, col = 1, 1
    for token in actions:
        row, col = row + MOVES[token][0], col + MOVES[token][1]
        if not (0 <= row < size and 0 <= col < size) or grid[row][col] != 0:
            return None
    return row, col


def prim_tree_distribution(size: int) -> dict[frozenset, fractions.Fraction]:
    """Exact probability of every maze randomised Prim produces on a size x size grid.

    A maze is identified by its set of carved links, each a frozenset of two cells in cell coordinates
    (i, j) <-> grid (2i+1, 2j+1). Exhaustive over all choice sequences, merged by the partial tree.
    """
    n = (size - 1) // 2
    cells = [(i, j) for i in range(n) for j in range(n)]

    def cell_neighbours(cell):
        i, j = cell
        steps = ((-1, 0), (1, 0), (0, -1), (0, 1))
        return [(i + di, j + dj) for di, dj in steps if 0 <= i + di < n and 0 <= j + dj < n]

    states = {(frozenset([(0, 0)]), frozenset()): fractions.Fraction(1)}
    for _ in range(n * n - 1):
        next_states = collections.defaultdict(fractions.Fraction)
        for (carved, links), prob in states.items():
            frontier = [c for c in cells if c not in carved and any(nb in carved for nb in cell_neighbours(c))]
            for cell in frontier:
                carved_nbrs = [nb for nb in cell_neighbours(cell) if nb in carved]
                for nb in carved_nbrs:
                    key = (carved | {cell}, links | {frozenset((cell, nb))})
                    next_states[key] += prob / (len(frontier) * len(carved_nbrs))
        states = next_states
    return {links: prob for (_, links), prob in states.items()}


def grid_links(grid) -> frozenset:
    """The carved links of a maze grid, in the form of `prim_tree_distribution`'s keys."""
    size = len(grid)
    n = (size - 1) // 2
    links = set()
    for i in range(n):
        for j in range(n):
            if i + 1 < n and grid[2 * i + 2][2 * j + 1] == 0:
                links.add(frozenset(((i, j), (i + 1, j))))
            if j + 1 < n and grid[2 * i + 1][2 * j + 2] == 0:
                links.add(frozenset(((i, j), (i, j + 1))))
    return frozenset(links)
