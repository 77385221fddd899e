"""Language models on verifiable math: tokenizer and chat templates, math verifier, data, the text trainer.

See docs/language_models.md. The trainer is `maxrl_jax.text.train.train_and_evaluate` (config.task "text").
"""
