"""The classification testbed's model-side functions: train state, optimizer, forward, train and eval steps.

A rollout for input x is a class sampled from the classifier's softmax (maxrl_jax/classification/objectives.py);
the trainer (maxrl_jax/trainers/classification.py) fuses `steps_per_call` of `make_train_step`'s steps into one
jitted `lax.scan`. Keys are `fold_in(named_key, state.step)` inside the step, so a resumed run repeats the
uninterrupted one exactly.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from maxrl_jax import metrics as metrics_lib
from maxrl_jax.classification import data as data_lib
from maxrl_jax.classification import objectives

Array = jax.Array

CHECKPOINT_PHASE = "train"  # Checkpoints live in <workdir>/checkpoints/train/<step>.


class TrainState(struct.PyTreeNode):
  """step: int32 scalar; params; batch_stats ({} for models without batch norm); opt_state."""

  step: Array
  params: Any
  batch_stats: Any
  opt_state: Any


def make_optimizer(optim_config, num_steps: int, steps_per_epoch: int):
  """(optax transformation, learning-rate schedule) from config.optim."""
  if optim_config.warmup_steps >= 0:
    warmup = int(optim_config.warmup_steps)
  else:
    warmup = int(round(optim_config.warmup_epochs * steps_per_epoch))
  warmup = min(warmup, max(num_steps - 1, 0))
  peak = float(optim_config.learning_rate)
  if optim_config.schedule == "cosine":
    schedule = optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(num_steps, warmup + 1), 0.0)
  else:
    schedule = optax.join_schedules(
        [optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak)], [warmup]) if warmup else (
            optax.constant_schedule(peak))
  parts = []
  if optim_config.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(optim_config.grad_clip))
  if optim_config.name == "sgd":
    if optim_config.weight_decay > 0:
      parts.append(optax.add_decayed_weights(optim_config.weight_decay))
    parts.append(optax.sgd(schedule, momentum=optim_config.momentum or None,
                           nesterov=bool(optim_config.nesterov)))
  else:
    parts.append(optax.adamw(schedule, b1=optim_config.b1, b2=optim_config.b2,
                             weight_decay=optim_config.weight_decay))
  return optax.chain(*parts), schedule


def _variables(params, batch_stats) -> dict:
  return {"params": params, "batch_stats": batch_stats} if batch_stats else {"params": params}


def forward(model, params, batch_stats, x, train: bool):
  """Logits [B, C] and (in train mode) the updated batch statistics."""
  if train and batch_stats:
    logits, updates = model.apply(_variables(params, batch_stats), x, train=True, mutable=["batch_stats"])
    return logits, updates["batch_stats"]
  return model.apply(_variables(params, batch_stats), x, train=train), batch_stats


def make_train_step(model, tx, schedule, objective: objectives.Objective, rollout_key: Array,
                    augment_key: Array, preprocess_kwargs: dict):
  """Returns train_step(state, batch) -> (state, metrics) for uint8 batch {"image", "label"}."""

  def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    step_rollout_key = jax.random.fold_in(rollout_key, state.step)
    step_augment_key = jax.random.fold_in(augment_key, state.step)
    x = data_lib.device_preprocess(batch["image"], step_augment_key, train=True, **preprocess_kwargs)
    labels_B = batch["label"]

    def loss_fn(params):
      logits_BxC, new_batch_stats = forward(model, params, state.batch_stats, x, train=True)
      loss_B, aux = objectives.objective_loss(objective, logits_BxC, labels_B, step_rollout_key)
      return jnp.mean(loss_B), (logits_BxC, new_batch_stats, aux)

    (loss, (logits_BxC, new_batch_stats, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    logp_BxC = jax.nn.log_softmax(jax.lax.stop_gradient(logits_BxC), axis=-1)
    logp_label_B = jnp.take_along_axis(logp_BxC, labels_B[:, None], axis=-1)[:, 0]
    step_metrics = {
        "loss": loss,
        "pass_rate": jnp.mean(jnp.exp(logp_label_B)),
        "nll": -jnp.mean(logp_label_B),
        "top1": jnp.mean((jnp.argmax(logp_BxC, -1) == labels_B).astype(jnp.float32)),
        "grad_norm": optax.global_norm(grads),
        "lr": schedule(state.step),
    }
    if objective.sampled:
      k_B = aux["num_successes"].astype(jnp.float32)
      step_metrics["frac_solved"] = jnp.mean((k_B > 0).astype(jnp.float32))
      step_metrics["mean_successes"] = jnp.mean(k_B)
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=new_batch_stats,
                              opt_state=opt_state)
    return new_state, step_metrics

  return train_step


def make_eval_step(model, preprocess_kwargs: dict, ks: tuple[int, ...]):
  """Returns eval_step(params, batch_stats, batch) -> sums over the valid examples of the batch."""

  def eval_step(params, batch_stats, batch):
    x = data_lib.device_preprocess(batch["image"], None, train=False, **preprocess_kwargs)
    logits_BxC, _ = forward(model, params, batch_stats, x, train=False)
    logp_BxC = jax.nn.log_softmax(logits_BxC, axis=-1)
    logp_B = jnp.take_along_axis(logp_BxC, batch["label"][:, None], axis=-1)[:, 0]
    p_B = jnp.exp(logp_B)
    valid_B = batch["valid"].astype(jnp.float32)
    pass_BxK = metrics_lib.analytic_pass_at_k(p_B, ks)
    top1_B = (jnp.argmax(logits_BxC, -1) == batch["label"]).astype(jnp.float32)
    return {
        "count": jnp.sum(valid_B),
        "pass_rate": jnp.sum(p_B * valid_B),
        "nll": -jnp.sum(logp_B * valid_B),
        "top1": jnp.sum(top1_B * valid_B),
        "pass_at_k": jnp.sum(pass_BxK * valid_B[:, None], axis=0),
    }

  return eval_step


def softmax_probabilities(model, params, batch_stats, images_uint8: np.ndarray, preprocess_kwargs: dict,
                          batch_size: int = 1000) -> np.ndarray:
  """Eval-mode softmax probabilities [n, C] (float32 numpy) for uint8 images; used by the analyses."""
  apply = jax.jit(lambda p, s, im: jax.nn.softmax(forward(
      model, p, s, data_lib.device_preprocess(im, None, train=False, **preprocess_kwargs), False)[0], -1))
  return np.concatenate([np.asarray(apply(params, batch_stats, images_uint8[i:i + batch_size]))
                         for i in range(0, len(images_uint8), batch_size)])


def create_train_state(model, tx, image_shape: tuple[int, ...], init_key: Array) -> TrainState:
  """A fresh TrainState (call under jax.jit, or jax.eval_shape for a restore template)."""
  variables = model.init({"params": init_key}, jnp.zeros((1,) + tuple(image_shape), jnp.float32), train=False)
  params = variables["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=variables.get("batch_stats", {}),
                    opt_state=tx.init(params))
