"""Language models on verifiable math: tokenizer and chat templates, math verifier, data, the text trainer.

See docs/language_models.md. The task is maxrl_jax/tasks/text.py (config.task "text"), trained by
maxrl_jax/trainers/rl.py.
"""
