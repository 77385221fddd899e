r"""How much decode work static batching spends on finished rollouts, and what in-flight refilling recovers.

    python scripts/batching_waste.py                      # uniform lengths in [100, 2048] and the 17x17 mazes
    python scripts/batching_waste.py --no-maze --chunks=128,1024 --rollouts=32768 --low=100 --high=2048

The sampler (`maxrl_jax.sampling.sample_rollouts`) decodes a call's rows (prompts x rollouts) together and
stops when every row has emitted a stop token (or at the cap M): a call costs rows x (longest response) row-
steps, of which sum(lengths) produce tokens. With lengths drawn i.i.d. from a distribution, this prints, per
chunk size c (rows decoded together):

- `static_waste`: 1 - sum(lengths) / sum over calls of c x max(lengths in the call), the fraction of row-steps
  that go to rollouts already finished;
- `inflight_waste`: the same with c slots refilled from the queue of remaining rollouts as soon as one
  finishes (in-flight / continuous batching), where only the tail of the last rollouts is idle;
- `recovered`: the fraction of static batching's row-steps that refilling saves, 1 - inflight / static.

Row-steps weigh every step alike. (As implemented, each step also reads all M preallocated suffix slots of
each row, so the wasted row-steps cost as much as the useful ones.) Lengths of rollouts of one prompt are
correlated in practice; i.i.d. draws are the simple case. The maze distribution is that of the shortest
solutions of random 17x17 mazes (moves + the DONE token), the lengths a policy that solves them emits.
Prints one JSON object (also written to --out).
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # Runs as a script.


def static_row_steps(lengths: np.ndarray, chunk: int) -> int:
  """Row-steps of static batching: lengths [R] in calls of `chunk` consecutive rows, each run to its longest."""
  total = 0
  for start in range(0, len(lengths), chunk):
    part = lengths[start:start + chunk]
    total += len(part) * int(part.max())  # A last, partial call has fewer rows.
  return total


def inflight_row_steps(lengths: np.ndarray, chunk: int) -> int:
  """Row-steps with `chunk` slots, each refilled with the next rollout when its rollout finishes: chunk x the
  step at which the last rollout finishes (slots idle only once the queue is empty)."""
  slots = [0] * min(chunk, len(lengths))
  heapq.heapify(slots)
  for length in lengths:
    heapq.heappush(slots, heapq.heappop(slots) + int(length))
  return chunk * max(slots)


def waste_table(lengths: np.ndarray, chunks: list[int]) -> list[dict]:
  """Per chunk size: static and in-flight waste fractions and the share of row-steps refilling saves."""
  useful = int(lengths.sum())
  rows = []
  for chunk in chunks:
    static = static_row_steps(lengths, chunk)
    inflight = inflight_row_steps(lengths, chunk)
    rows.append({"chunk": chunk, "static_waste": round(1 - useful / static, 4),
                 "inflight_waste": round(1 - useful / inflight, 4), "recovered": round(1 - inflight / static, 4)})
  return rows


def maze_lengths(count: int, seed: int) -> np.ndarray:
  """Response lengths (moves + DONE) of the shortest solutions of `count` random 17x17 mazes."""
  import jax

  from maxrl_jax.tasks.maze import env as maze

  grids = maze.generate_mazes(jax.random.key(seed), count, maze.PAPER_MAZE_SIZE)
  _, moves = jax.jit(maze.shortest_path_actions_batch)(grids)
  return np.asarray(moves, np.int64) + 1


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--rollouts", type=int, default=32768, help="rollouts per RL step (the paper's GSM8K: 256 x 128)")
  parser.add_argument("--low", type=int, default=100, help="shortest response (tokens, inclusive)")
  parser.add_argument("--high", type=int, default=2048, help="longest response (tokens, inclusive; the cap M)")
  parser.add_argument("--chunks", default="1,16,128,512,1024,4096,8192",
                      help="rows decoded together (prompts per call x rollouts per prompt), comma-separated")
  parser.add_argument("--maze", action=argparse.BooleanOptionalAction, default=True,
                      help="also the shortest-path lengths of random 17x17 mazes")
  parser.add_argument("--maze_count", type=int, default=2048, help="mazes drawn for the maze distribution")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default="", help="also write the JSON here")
  args = parser.parse_args(argv)
  rng = np.random.default_rng(args.seed)
  chunks = [int(c) for c in args.chunks.split(",")]
  uniform = rng.integers(args.low, args.high + 1, size=args.rollouts)
  report = {"rollouts": args.rollouts, "seed": args.seed,
            "uniform": {"low": args.low, "high": args.high, "mean_length": round(float(uniform.mean()), 1),
                        "chunks": waste_table(uniform, chunks)}}
  if args.maze:
    observed = maze_lengths(args.maze_count, args.seed)
    lengths = rng.choice(observed, size=args.rollouts)  # Resampled to the step's rollout count.
    report["maze_17x17"] = {"mazes": args.maze_count, "mean_length": round(float(observed.mean()), 1),
                            "min_length": int(observed.min()), "max_length": int(observed.max()),
                            "chunks": waste_table(lengths, chunks)}
  text = json.dumps(report, indent=1)
  print(text)
  if args.out:
    with open(args.out, "w") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  main()
