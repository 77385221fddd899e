"""The RL step (step.py), supervised fine-tuning (sft.py) and population training (population.py)."""
