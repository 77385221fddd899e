"""Classification testbed: count-based losses, samplers, models, data paths, configs, end-to-end runs."""

import json
import os
import subprocess
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # configs/ and experiments/ import from the repository root wherever pytest runs.

from configs import classification as cls_configs  # noqa: E402
from experiments import classification_sweep  # noqa: E402
from maxrl_jax import estimators  # noqa: E402
from maxrl_jax.classification import data as data_lib  # noqa: E402
from maxrl_jax.classification import grad_norms  # noqa: E402
from maxrl_jax.classification import models  # noqa: E402
from maxrl_jax.classification import objectives  # noqa: E402
from maxrl_jax import train as train_lib  # noqa: E402
from maxrl_jax.classification import steps as steps_lib  # noqa: E402
from maxrl_jax.trainers import loop  # noqa: E402

ESTIMATOR_CASES = [
    ("reinforce", {}), ("rloo", {}), ("dr_grpo", {}), ("grpo", {}), ("maxrl", {}),
    ("maxrl", {"zero_failed_groups": False}), ("maclaurin", {"order": 5}), ("pkpo", {"k": 3}),
    ("pkpo", {"k": 2, "baseline": False}),
]


# ----------------------------------------------------------------------------------------------------------
# Objectives.


@pytest.mark.parametrize("name,kwargs", ESTIMATOR_CASES)
def test_count_loss_gradient_equals_per_sample_gradient(name, kwargs):
  """For the same samples, the count-based surrogate and the per-sample surrogate have the same gradient."""
  batch, num_classes, n = 6, 4, 12
  logits = 1.5 * jax.random.normal(jax.random.key(0), (batch, num_classes))
  labels = jnp.arange(batch) % num_classes
  objective = objectives.make_objective(name, kwargs, n)
  samples = objectives.sample_classes(jax.random.key(1), logits, n)
  counts = objectives.counts_from_samples(samples, num_classes)
  k = jnp.take_along_axis(counts, labels[:, None], -1)[:, 0]
  assert 0 < int(jnp.sum(k)) < batch * n  # Successes and failures both present.

  def count_loss(lg):
    adv_succ, adv_fail = objectives.success_failure_advantages(objective, k)
    return jnp.mean(objectives.count_surrogate_loss(lg, labels, counts, adv_succ, adv_fail, n))

  def sample_loss(lg):
    return objectives.per_sample_surrogate_loss(lg, labels, samples, objective)

  (count_value, count_grad), (sample_value, sample_grad) = jax.jit(
      lambda lg: (jax.value_and_grad(count_loss)(lg), jax.value_and_grad(sample_loss)(lg)))(logits)
  np.testing.assert_allclose(count_value, sample_value, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(count_grad, sample_grad, rtol=1e-5, atol=1e-6)


def test_count_loss_gradient_through_model_parameters():
  model = models.MLP(num_classes=5, hidden_sizes=(8,), zero_init_head=False)
  objective = objectives.make_objective("maxrl", {}, 32)

  @jax.jit
  def both_gradients(key):
    x = jax.random.normal(jax.random.fold_in(key, 0), (4, 3, 3, 1))
    labels = jnp.array([0, 1, 2, 3])
    params = model.init(jax.random.fold_in(key, 1), x)["params"]
    samples = objectives.sample_classes(jax.random.fold_in(key, 2), model.apply({"params": params}, x), 32)
    counts = objectives.counts_from_samples(samples, 5)
    k = jnp.take_along_axis(counts, labels[:, None], -1)[:, 0]
    adv_succ, adv_fail = objectives.success_failure_advantages(objective, k)
    grad_counts = jax.grad(lambda p: jnp.mean(objectives.count_surrogate_loss(
        model.apply({"params": p}, x), labels, counts, adv_succ, adv_fail, 32)))(params)
    grad_samples = jax.grad(lambda p: objectives.per_sample_surrogate_loss(
        model.apply({"params": p}, x), labels, samples, objective))(params)
    return grad_counts, grad_samples

  grad_counts, grad_samples = both_gradients(jax.random.key(2))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), grad_counts, grad_samples)


@pytest.mark.parametrize("name,kwargs", ESTIMATOR_CASES)
def test_group_level_advantages_equal_the_dense_registry_rule(name, kwargs):
  """A_succ(K), A_fail(K) from the group-level call equal the dense estimator on [1]*K + [0]*(N-K)."""
  n = 7
  objective = objectives.make_objective(name, kwargs, n)
  ks = np.arange(n + 1)
  rewards = (np.arange(n)[None, :] < ks[:, None]).astype(np.float32)
  dense = np.asarray(estimators.get_advantage_fn(name, **kwargs)(jnp.asarray(rewards)))
  adv_succ, adv_fail = objectives.success_failure_advantages(objective, jnp.asarray(ks))
  np.testing.assert_allclose(np.asarray(adv_succ)[1:], dense[1:, 0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(adv_fail)[:-1], dense[:-1, -1], rtol=1e-5, atol=1e-6)
  assert adv_succ[0] == 0 and adv_fail[-1] == 0  # Values that multiply zero counts are zeroed.


@pytest.mark.parametrize("method", ["categorical", "binomial"])
def test_samplers_draw_multinomial_counts(method):
  """Mean and variance of the counts match Multinomial(N, p), also for N = 4096 (no [B, N] array needed)."""
  probs = np.array([0.001, 0.2, 0.299, 0.5])
  rows, n = 300, 4096
  logits = jnp.log(jnp.asarray(np.tile(probs, (rows, 1)), jnp.float32))
  counts = np.asarray(objectives.sample_class_counts(jax.random.key(5), logits, n, method))
  assert counts.dtype == np.int32 and np.all(counts.sum(-1) == n) and counts.min() >= 0
  freq = counts.mean(0) / n
  assert np.all(np.abs(freq - probs) <= 4 * np.sqrt(probs * (1 - probs) / (n * rows)) + 1e-6), freq
  np.testing.assert_allclose(counts.var(0) / n, probs * (1 - probs), rtol=0.2)


def test_large_n_costs_only_counts():
  """N = 4096: counts of shape [B, C], and the loss graph has no [B, N] array."""
  logits = jax.random.normal(jax.random.key(6), (4, 10))
  labels = jnp.arange(4)
  objective = objectives.make_objective("maxrl", {}, 4096)
  loss, aux = jax.jit(lambda lg, key: objectives.objective_loss(objective, lg, labels, key))(
      logits, jax.random.key(7))
  assert loss.shape == (4,) and np.all(np.isfinite(loss)) and aux["num_successes"].shape == (4,)
  counts = jnp.zeros((4, 10), jnp.int32).at[:, 0].set(4096)
  jaxpr = jax.make_jaxpr(lambda lg: objectives.count_surrogate_loss(
      lg, labels, counts, jnp.ones(4), jnp.ones(4), 4096))(logits)
  assert all(4096 not in v.aval.shape for eqn in jaxpr.eqns for v in eqn.outvars)


@pytest.mark.parametrize("name,kwargs,n,fragment", [
    ("maxrl", {}, 1, "num_samples=1 is invalid for objective 'maxrl'"),
    ("grpo", {}, 1, "num_samples=1 is invalid"),
    ("maclaurin", {"order": 8}, 4, "exceeds the group size"),
    ("not_an_objective", {}, 4, "allowed"),
    ("maxrl", {"order": 3}, 4, "unknown argument"),
    ("cross_entropy", {"order": 3}, 4, "takes no arguments"),
    ("maxrl", {}, 0, "integer >= 1"),
])
def test_invalid_objectives_raise_clear_errors(name, kwargs, n, fragment):
  with pytest.raises(ValueError, match=fragment):
    objectives.make_objective(name, kwargs, n)


def test_reinforce_accepts_a_single_rollout():
  assert objectives.make_objective("reinforce", {}, 1).num_samples == 1


# ----------------------------------------------------------------------------------------------------------
# Models.


def test_batch_norm_train_and_eval_modes():
  model = models.SmallCNN(num_classes=3, channels=(4,), dense_size=8, batch_norm=True, zero_init_head=False)
  x = jax.random.normal(jax.random.key(8), (4, 6, 6, 1)) * 3.0 + 1.0
  other = jax.random.normal(jax.random.key(9), (2, 6, 6, 1))

  @jax.jit
  def run(x, other):
    variables = model.init(jax.random.key(10), x, train=False)
    mixed = jnp.concatenate([x[:2], other])
    out = {"variables": variables}
    out["eval_a"], out["eval_b"] = (model.apply(variables, b, train=False) for b in (x, mixed))
    out["train_a"], out["updates"] = model.apply(variables, x, train=True, mutable=["batch_stats"])
    out["train_b"], _ = model.apply(variables, mixed, train=True, mutable=["batch_stats"])
    out["conv_out"] = flax.linen.Conv(4, (3, 3), use_bias=False).apply(
        {"params": variables["params"]["Conv_0"]}, x)
    # The trainer's forward: train mode returns new statistics, eval mode returns the old ones.
    _, out["forward_train_stats"] = steps_lib.forward(model, variables["params"], variables["batch_stats"], x,
                                                      train=True)
    _, out["forward_eval_stats"] = steps_lib.forward(model, variables["params"], variables["batch_stats"], x,
                                                     train=False)
    return out

  out = run(x, other)
  assert set(out["variables"]) == {"params", "batch_stats"}
  # Eval mode: running averages, so an example's logits do not depend on the rest of the batch.
  np.testing.assert_allclose(out["eval_a"][:2], out["eval_b"][:2], rtol=1e-5, atol=1e-6)
  # Train mode: batch statistics, so they do; and the running averages move towards the batch's.
  assert not np.allclose(out["train_a"][:2], out["train_b"][:2], atol=1e-4)
  old_mean = out["variables"]["batch_stats"]["BatchNorm_0"]["mean"]
  new_mean = out["updates"]["batch_stats"]["BatchNorm_0"]["mean"]
  np.testing.assert_allclose(new_mean, 0.9 * old_mean + 0.1 * out["conv_out"].mean((0, 1, 2)), rtol=1e-4,
                             atol=1e-5)
  np.testing.assert_allclose(out["forward_train_stats"]["BatchNorm_0"]["mean"], new_mean, rtol=1e-6)
  np.testing.assert_array_equal(out["forward_eval_stats"]["BatchNorm_0"]["mean"], old_mean)


@pytest.mark.parametrize("depth,stem,size", [(18, "cifar", 16), (50, "imagenet", 32)])
def test_resnet_shapes_and_batch_stats(depth, stem, size):
  model = models.ResNet(num_classes=7, depth=depth, width=4, stem=stem)
  x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
  assert "batch_stats" in variables
  logits, updates = jax.eval_shape(
      lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]), variables, x)
  assert logits.shape == (2, 7) and logits.dtype == jnp.float32
  assert jax.tree.structure(updates["batch_stats"]) == jax.tree.structure(variables["batch_stats"])


def test_zero_init_head_gives_uniform_policy():
  model = models.MLP(num_classes=200, hidden_sizes=(16,))
  x = jax.random.normal(jax.random.key(11), (3, 4, 4, 1))
  logits = jax.jit(lambda x: model.apply(model.init(jax.random.key(12), x), x))(x)
  np.testing.assert_allclose(jax.nn.softmax(logits), 1 / 200, rtol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# Data.


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def _data_config(name, data_dir):
  config = cls_configs.get_config("tiny")
  config.data.name = name
  config.data.data_dir = data_dir
  return config.data


def test_procedural_dataset_is_fixed_and_hard(data_dir):
  data = data_lib.load_data(_data_config("procedural_classes/c100", data_dir))
  assert data.num_classes == 100 and data.image_shape == (16, 16, 1)
  assert len(data.train) == 5000 and len(data.eval) == 1000
  assert np.all(np.bincount(data.train.labels, minlength=100) == 50)
  # Fixed splits: the TFDS files hold exactly the arrays the generator draws from fixed seeds.
  images, labels = data_lib.procedural_examples(data_lib.ProceduralClasses.builder_configs["c100"], "test")
  def canonical(ims, labs):  # TFDS shuffles records on write; compare as sorted (label, bytes) lists.
    return sorted((int(l), im.tobytes()) for im, l in zip(ims, labs))

  assert canonical(data.eval.images, data.eval.labels) == canonical(images, labels)
  # A second load reads the prepared files (no regeneration) and gives the same data.
  again = data_lib.load_data(_data_config("procedural_classes/c100", data_dir))
  np.testing.assert_array_equal(again.train.images, data.train.images)


def test_tfds_loading_path_with_mock_data(tmp_path):
  with tfds.testing.mock_data(num_examples=24):
    data = data_lib.load_data(_data_config("mnist", str(tmp_path)))
  assert data.num_classes == 10 and data.image_shape == (28, 28, 1)
  assert data.mean == (0.1307,) and len(data.train) == 24
  batch = data.train.get_batch(np.array([3, 1, 4]), train=True)
  assert batch["image"].shape == (3, 28, 28, 1) and batch["image"].dtype == np.uint8
  assert batch["label"].dtype == np.int32 and np.all((batch["label"] >= 0) & (batch["label"] < 10))


def test_streaming_split_resizes_on_the_host(tmp_path):
  with tfds.testing.mock_data(num_examples=6):
    config = _data_config("mnist", str(tmp_path))
    config.storage = "stream"
    config.image_size = 20
    data = data_lib.load_data(config)
    batch = data.train.get_batch(np.arange(4), train=True, rng=np.random.default_rng(0))
    evaluation = data.eval.get_batch(np.arange(2), train=False)
  assert batch["image"].shape == (4, 20, 20, 1) and evaluation["image"].shape == (2, 20, 20, 1)
  assert data.image_shape == (20, 20, 1)


def test_missing_dataset_says_how_to_prepare_it(tmp_path):
  with pytest.raises(data_lib.DatasetNotPreparedError) as info:
    data_lib.load_data(_data_config("cifar10", str(tmp_path)))
  message = str(info.value)
  assert "tfds build cifar10" in message and "array_record" in message and str(tmp_path) in message
  assert "procedural_classes" in message
  with pytest.raises(ValueError, match="not a TFDS dataset"):
    data_lib.load_data(_data_config("no_such_dataset_xyz", str(tmp_path)))


def test_train_batch_indices_are_epochs_of_permutations():
  seen = np.concatenate([data_lib.train_batch_indices(s, 10, 3, seed=0) for s in range(3)])
  assert sorted(seen.tolist()) == sorted(set(seen.tolist())) and len(seen) == 9  # One epoch, no repeats.
  np.testing.assert_array_equal(data_lib.train_batch_indices(4, 10, 3, 0),
                                data_lib.train_batch_indices(4, 10, 3, 0))


def test_device_augmentations_keep_shapes():
  images = jnp.asarray(np.random.default_rng(0).integers(0, 255, (3, 8, 8, 3)), jnp.uint8)
  for augment in ("flip", "crop_flip"):
    out = data_lib.device_preprocess(images, jax.random.key(0), mean=(0.5,), std=(0.25,), augment=augment,
                                     train=True)
    assert out.shape == (3, 8, 8, 3) and out.dtype == jnp.float32
  plain = data_lib.device_preprocess(images, None, mean=(0.5,), std=(0.25,), augment="crop_flip", train=False)
  np.testing.assert_allclose(plain, (images / 255.0 - 0.5) / 0.25, rtol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# Configs and end-to-end runs.


def _tiny_config(data_dir, **overrides):
  config = cls_configs.get_config("tiny")
  config.data.name = "procedural_classes/c100"
  config.data.data_dir = data_dir
  config.model.hidden_sizes = (32,)
  config.train.batch_size = 32
  config.train.num_steps = 20
  config.log_every_steps = 10
  config.train.steps_per_call = 10
  config.optim.warmup_steps = 0
  config.eval.every_steps = 10
  config.eval.batch_size = 500
  config.eval.num_train_examples = 200
  config.rollout.num_samples = 64
  config.progress_bar = False
  for path, value in overrides.items():
    node = config
    *parents, leaf = path.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


@pytest.mark.parametrize("preset", cls_configs.PRESETS)
def test_presets_validate(preset):
  config = cls_configs.get_config(preset)
  assert config.task == "classification"
  train_lib.validate_config(config)


def test_imagenet_preset_has_the_papers_hyperparameters():
  config = cls_configs.get_config("imagenet")
  assert (config.model.name, config.model.depth, config.data.name) == ("resnet", 50, "imagenet2012")
  assert (config.optim.name, config.optim.momentum, config.optim.learning_rate) == ("sgd", 0.9, 0.1)
  assert (config.optim.weight_decay, config.train.batch_size, config.train.num_epochs) == (1e-4, 256, 20.0)
  assert config.optim.schedule == "cosine" and config.optim.warmup_epochs > 0
  with pytest.raises(ValueError, match="Unknown classification preset"):
    cls_configs.get_config("nope")


@pytest.mark.parametrize("overrides,fragment", [
    ({"objective.name": "maxrl", "rollout.num_samples": 1}, "num_samples=1 is invalid"),
    ({"objective.name": "maclaurin"}, "order"),
    ({"log_every_steps": 15}, "multiple of config.train.steps_per_call"),
    ({"optim.name": "lamb"}, "optim.name"),
    ({"optim.schedule": "step"}, "optim.schedule"),
    ({"data.augment": "mixup"}, "data.augment"),
    ({"model.name": "vit"}, "model.name"),
    ({"train.batch_size": 0}, "batch_size"),
    ({"eval.ks": (1, 0)}, "eval.ks"),
])
def test_invalid_configs_raise_clear_errors(overrides, fragment):
  with pytest.raises(ValueError, match=fragment):
    train_lib.validate_config(_tiny_config("/nonexistent", **overrides))


@pytest.fixture(scope="module")
def tiny_run(data_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("run"))
  config = _tiny_config(data_dir, **{"checkpoint_every_steps": 10})
  summary = train_lib.train_and_evaluate(config, workdir)
  return workdir, config, summary


def test_end_to_end_writes_metrics_and_summary(tiny_run, capsys):
  workdir, _, summary = tiny_run
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  assert all({"step", "phase", "pass_rate"} <= set(r) for r in records)
  phases = [(r["step"], r["phase"]) for r in records]
  assert phases == [(0, "eval"), (0, "eval_train"), (10, "train"), (10, "eval"), (10, "eval_train"),
                    (20, "train"), (20, "eval"), (20, "eval_train")]
  assert records[0]["pass_rate"] == pytest.approx(0.01, rel=1e-4)  # Uniform initial policy, 100 classes.
  assert {"frac_solved", "mean_successes", "loss", "grad_norm", "lr"} <= set(records[2])
  with open(os.path.join(workdir, "summary.json")) as f:
    saved = json.load(f)
  assert saved["objective"] == "maxrl" and saved["num_samples"] == 64
  assert {f"pass@{k}" for k in (1, 2, 1024)} | {"top1", "pass_rate"} <= set(saved["eval"])
  assert saved["eval"]["pass@1"] == pytest.approx(saved["eval"]["pass_rate"])
  assert saved["initial_eval"]["pass@1"] == pytest.approx(0.01, rel=1e-4)
  assert saved["eval"]["pass@1"] > 0.01  # It learns something in 20 steps.
  assert json.load(open(os.path.join(workdir, "config.json")))["task"] == "classification"


def test_resumed_run_equals_uninterrupted_run(tiny_run, tmp_path):
  """Delete the last checkpoint and the summary of a finished run, rerun: it resumes from step 10."""
  import shutil  # pylint: disable=g-import-not-at-top

  workdir, config, _ = tiny_run
  resumed = str(tmp_path / "resumed")
  shutil.copytree(workdir, resumed)
  shutil.rmtree(os.path.join(resumed, "checkpoints", "train", "20"))
  os.remove(os.path.join(resumed, "summary.json"))
  summary = train_lib.train_and_evaluate(config, resumed)
  assert summary["resumed_from_step"] == 10
  _, _, params_a, _ = grad_norms.load_run(workdir)[1:]
  _, _, params_b, _ = grad_norms.load_run(resumed)[1:]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), params_a, params_b)
  with open(os.path.join(workdir, "metrics.jsonl")) as f_a, open(os.path.join(resumed, "metrics.jsonl")) as f_b:
    steps_a = [(json.loads(l)["step"], json.loads(l)["phase"]) for l in f_a]
    steps_b = [(json.loads(l)["step"], json.loads(l)["phase"]) for l in f_b]
  assert steps_a == steps_b


def test_end_to_end_cross_entropy_on_mock_mnist(tmp_path):
  config = _tiny_config(str(tmp_path / "tfds"), **{
      "data.name": "mnist", "objective.name": "cross_entropy", "train.batch_size": 8,
      "eval.num_train_examples": 16})
  with tfds.testing.mock_data(num_examples=40):
    summary = train_lib.train_and_evaluate(config, str(tmp_path / "run"))
  assert summary["objective"] == "cross_entropy" and summary["num_classes"] == 10
  assert summary["num_samples"] is None and 0.0 <= summary["eval"]["pass@1"] <= 1.0


def test_gradient_norm_analysis_matches_per_example_grads(tiny_run, tmp_path):
  workdir, config, _ = tiny_run
  _, data, model, params, batch_stats = grad_norms.load_run(workdir)
  batch = data.eval.get_batch(np.arange(5), train=False)
  kwargs = {"mean": data.mean, "std": data.std, "augment": "none"}
  ce = objectives.make_objective("cross_entropy", {}, 1)
  norms = grad_norms.per_input_gradient_norms(model, params, batch_stats, batch["image"], batch["label"], ce,
                                              jax.random.key(0), kwargs, chunk_size=4)

  @jax.jit
  def one_norm(p, image, label):
    def loss(p):
      x = data_lib.device_preprocess(image[None], None, train=False, **kwargs)
      return objectives.cross_entropy_loss(model.apply({"params": p}, x), label[None])[0]
    return jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(jax.grad(loss)(p))))

  for i in range(5):
    np.testing.assert_allclose(norms[i], one_norm(params, batch["image"][i], batch["label"][i]), rtol=1e-4)
  result = grad_norms.analyze(workdir, out_dir=str(tmp_path), objective_names=("maxrl",),
                              num_examples=64, num_samples=16)
  assert os.path.getsize(result["files"]["png"]) > 0
  assert len(result["maxrl"]) == len(result["pass_rate"]) == 64


def test_sweep_plan_skips_invalid_pairs():
  assert classification_sweep.parse_objective("maclaurin:order=16") == ("maclaurin", {"order": 16})
  plan = classification_sweep.plan_runs(["cross_entropy", "reinforce", "maxrl"], [1, 4])
  assert [(p[0], p[3], p[4] is None) for p in plan] == [
      ("cross_entropy", None, True), ("reinforce", 1, True), ("reinforce", 4, True), ("maxrl", 1, False),
      ("maxrl", 4, True)]


@pytest.mark.skipif(not os.path.exists(os.path.join(REPO, "maxrl_jax", "main.py")), reason="no main.py yet")
def test_main_entry_point_runs_the_classification_task(data_dir, tmp_path):
  workdir = str(tmp_path / "main_run")
  cmd = [sys.executable, "-m", "maxrl_jax.main", "--config=configs/classification.py:tiny",
         f"--workdir={workdir}", f"--config.data.data_dir={data_dir}",
         "--config.data.name=procedural_classes/c100", "--config.train.num_steps=10",
         "--config.train.steps_per_call=10", "--config.log_every_steps=10", "--config.model.hidden_sizes=(16,)",
         "--config.eval.num_train_examples=100", "--config.objective.name=grpo",
         "--config.rollout.num_samples=8", "--config.progress_bar=False"]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "pass@1024" in out.stdout
  with open(os.path.join(workdir, "summary.json")) as f:
    assert json.load(f)["objective"] == "grpo"


def test_a_diverged_run_stops_inside_a_fused_call_naming_the_step(data_dir, tmp_path):
  workdir = str(tmp_path / "run")
  config = _tiny_config(data_dir, **{"optim.learning_rate": float("inf"), "checkpoint_every_steps": 10})
  with pytest.raises(loop.NonFiniteError, match=r"train diverged: .* is (nan|inf|not finite) at step [1-9]\b"):
    train_lib.train_and_evaluate(config, workdir)
  assert not os.path.exists(os.path.join(workdir, "summary.json"))
  directory = os.path.join(workdir, "checkpoints", "train")
  assert not os.path.isdir(directory) or not [s for s in os.listdir(directory) if s.isdigit()]


@pytest.mark.parametrize("override, new", [("train.log_every", "log_every_steps"),
                                           ("checkpoint.every_steps", "checkpoint_every_steps"),
                                           ("eval.pass_at_k", "eval.ks"), ("objective.kwargs.order", "objective")])
def test_fields_of_earlier_configs_name_their_replacement(override, new):
  from maxrl_jax.trainers import harness  # pylint: disable=g-import-not-at-top

  assert f"config.{new}" in harness.renamed_field_message(override)
  cmd = [sys.executable, "-m", "maxrl_jax.main", "--config=configs/classification.py:tiny", "--workdir=/tmp/x",
         f"--config.{override}=1"]
  out = subprocess.run(cmd, cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True,
                       timeout=120)
  assert out.returncode == 2 and f"config.{new}" in out.stderr and "Traceback" not in out.stderr


_MESH_SCRIPT = """
import json, sys
import jax
sys.path.insert(0, {repo!r})
from configs import classification as cls_configs
from maxrl_jax import train
config = cls_configs.get_config("tiny")
config.data.name = "procedural_classes/c100"
config.data.data_dir = {data_dir!r}
config.model.hidden_sizes = (32,)
config.train.batch_size, config.train.num_steps, config.train.steps_per_call = 32, 20, 10
config.log_every_steps, config.checkpoint_every_steps = 10, 10
config.optim.warmup_steps = 0
config.eval.every_steps, config.eval.batch_size, config.eval.num_train_examples = 10, 500, 200
config.rollout.num_samples = 64
config.progress_bar = False
config.mesh.shape = {shape!r}
summary = train.train_and_evaluate(config, {workdir!r})
json.dump({{"summary": summary, "devices": len(jax.devices())}}, open({out!r}, "w"))
"""


def test_the_mesh_splits_batches_over_two_devices_and_matches_one(data_dir, tiny_run, tmp_path):
  """config.mesh on 2 fake CPU devices (data=2): the same run as on one device, up to float round-off."""
  workdir, out = str(tmp_path / "run"), str(tmp_path / "out.json")
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0")
  script = _MESH_SCRIPT.format(repo=REPO, data_dir=data_dir, workdir=workdir, out=out, shape=(-1, 1))
  result = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  with open(out) as f:
    outputs = json.load(f)
  assert outputs["devices"] == 2 and outputs["summary"]["hardware"]["num_devices"] == 2
  single = tiny_run[2]
  for key in ("pass@1", "pass@64", "top1", "nll"):
    np.testing.assert_allclose(outputs["summary"]["eval"][key], single["eval"][key], rtol=2e-3, err_msg=key)
