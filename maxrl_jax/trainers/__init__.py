"""Trainers: the run lifecycle (harness.py), the step loop (loop.py), and one trainer per kind of task
(rl.py: token tasks, SFT then RL; classification.py: the classification testbed)."""
