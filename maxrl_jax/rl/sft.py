"""Supervised fine-tuning (SFT) on reference responses: the next-token loss and its jitted step."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding

from maxrl_jax.rl import step as step_lib

Array = jax.Array


def next_token_loss(model_fns, params, inputs: Array, loss_mask: Array) -> tuple[Array, dict]:
  """Mean cross-entropy over the masked target tokens.

  Args:
    inputs: [B, T] int tokens (prompt followed by target).
    loss_mask: [B, T] bool, True on tokens to predict; logits at t - 1 predict inputs[:, t].

  Returns:
    (loss, {"token_accuracy": ...}).
  """
  logits = model_fns.forward(params, inputs[:, :-1])  # [B, T-1, V]
  targets, weights = inputs[:, 1:], loss_mask[:, 1:].astype(jnp.float32)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  denom = jnp.maximum(jnp.sum(weights), 1.0)
  accuracy = jnp.sum((jnp.argmax(logits, -1) == targets) * weights) / denom
  return jnp.sum(nll * weights) / denom, {"token_accuracy": accuracy}


def sft_step(model_fns, tx: optax.GradientTransformation, state: step_lib.TrainState, batch: dict
             ) -> tuple[step_lib.TrainState, dict]:
  """One supervised step (pure); batch has "inputs" [B, T] and "loss_mask" [B, T]."""
  (loss, aux), grads = jax.value_and_grad(
      lambda p: next_token_loss(model_fns, p, batch["inputs"], batch["loss_mask"]), has_aux=True)(
          state.params)
  new_state = step_lib.apply_gradients(state, grads, tx)
  return new_state, {"loss": loss, "grad_norm": optax.global_norm(grads), **aux}


def make_sft_step(model_fns, tx: optax.GradientTransformation, *, state_sharding=None,
                  batch_sharding: NamedSharding | None = None):
  """Jitted `sft_step(state, batch) -> (state, metrics)` (state donated).

  With `state_sharding` (a TrainState of shardings, see sharding.init_sharded) and `batch_sharding` (the
  leading axis split over the mesh), the step is jitted with those in/out shardings, metrics replicated.
  """
  return step_lib.jit_step(functools.partial(sft_step, model_fns, tx), state_sharding, batch_sharding, 0)


def optimizer(sft_config) -> optax.GradientTransformation:
  """AdamW with linear warm-up (none when warmup_steps is 0) then a constant learning rate, from config.sft."""
  warmup = int(sft_config.get("warmup_steps", 0))
  if warmup > 0:
    schedule = optax.join_schedules(
        [optax.linear_schedule(0.0, sft_config.learning_rate, warmup),
         optax.constant_schedule(sft_config.learning_rate)], [warmup])
  else:
    schedule = optax.constant_schedule(sft_config.learning_rate)
  return step_lib.adamw(schedule, sft_config.b1, sft_config.b2, sft_config.weight_decay, sft_config.grad_clip)
