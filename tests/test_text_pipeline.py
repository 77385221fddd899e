"""The text pipeline: tokenizer and chat templates, data loading, left-padded prompts, the micro-batched
update, and the tiny end-to-end runs of configs/gsm8k_smollm2.py and configs/qwen3_math.py."""

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxrl_jax import estimators
from maxrl_jax import sampling
from maxrl_jax import train
from maxrl_jax.models import decoder as dec
from maxrl_jax.rl import step as step_lib
from maxrl_jax.tasks import base as tasks_base
from maxrl_jax.tasks import text as text_task
from maxrl_jax.text import data as data_lib
from maxrl_jax.text import synthetic
from maxrl_jax.text import tokenizer as tok

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from configs import gsm8k_smollm2  # noqa: E402
from configs import qwen3_math  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tok"))
  synthetic.write_tokenizer(path)
  return path


# ------------------------------------------------------------------------------------------------ tokenizer


def test_tokenizer_round_trip_and_special_tokens(tokenizer_dir):
  tokenizer = tok.TextTokenizer.from_pretrained(tokenizer_dir)
  text = "What is 3 + 4? \\boxed{7} é"
  ids = tokenizer.encode(text)
  assert tokenizer.decode(ids) == text
  assert tokenizer.token_to_id("\\boxed{") in ids  # added whole-string token
  im_end, endoftext = tokenizer.token_to_id("<|im_end|>"), tokenizer.token_to_id("<|endoftext|>")
  assert tokenizer.eos_token_ids == tuple(sorted({im_end, endoftext}))  # tokenizer_config + generation_config
  assert tokenizer.pad_id == endoftext
  # Special tokens and ids beyond the tokenizer (padded model vocabularies) vanish when decoding.
  assert tokenizer.decode(ids + [im_end, tokenizer.vocab_size + 3]) == text
  assert tokenizer.decode_batch([ids, ids[:1]]) == [text, "What is"]


def test_builtin_templates():
  messages = [{"role": "user", "content": "Hi"}]
  assert tok.ChatTemplate("chatml").render(messages) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
  smol = tok.ChatTemplate("smollm2").render(messages)
  assert smol.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
  with_system = [{"role": "system", "content": "S"}] + messages
  assert tok.ChatTemplate("smollm2").render(with_system).startswith("<|im_start|>system\nS<|im_end|>")
  assert "Alibaba Cloud" in tok.ChatTemplate("qwen2.5").render(messages)
  qwen3 = tok.ChatTemplate("qwen3")
  assert qwen3.render(messages).endswith("<|im_start|>assistant\n")
  assert qwen3.render(messages, enable_thinking=False).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
  assert tok.ChatTemplate("none").render(messages) == "Hi"
  assert tok.ChatTemplate("none").add_special_tokens and not tok.ChatTemplate("chatml").add_special_tokens


def test_jinja_template_from_the_checkpoint(tokenizer_dir, tmp_path):
  pytest.importorskip("jinja2")
  messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 1 + 1?"}]
  auto = tok.ChatTemplate.from_pretrained(tokenizer_dir, "auto")
  assert auto.name == "jinja" and auto.end_of_turn == "<|im_end|>"
  assert auto.render(messages) == tok.ChatTemplate("chatml").render(messages)
  # A template list, and templates that use bos_token, raise_exception and loop controls.
  source = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tools') }}"
            "{% endif %}{% if loop.index > 1 %}{% break %}{% endif %}[{{ m['content'] | tojson }}]{% endfor %}")
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(
      {"bos_token": {"content": "<s>"}, "chat_template": [{"name": "default", "template": source}]}))
  template = tok.ChatTemplate.from_pretrained(str(tmp_path))
  assert template.render(messages) == '<s>["Be brief."]'
  with pytest.raises(Exception, match="no tools"):
    template.render([{"role": "tool", "content": ""}])
  (tmp_path / "tokenizer_config.json").write_text("{}")
  assert tok.ChatTemplate.from_pretrained(str(tmp_path)).name == "none"
  (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}!")  # transformers 5 layout
  assert tok.ChatTemplate.from_pretrained(str(tmp_path)).render(messages) == "Be brief.!"


def test_stop_tokens_include_end_of_turn(tokenizer_dir):
  tokenizer = tok.TextTokenizer.from_pretrained(tokenizer_dir)
  tokenizer.eos_token_ids = (tokenizer.token_to_id("<|endoftext|>"),)  # e.g. a base model's eos only
  stops = tok.stop_token_ids(tokenizer, tok.ChatTemplate("chatml", end_of_turn="<|im_end|>"))
  assert tokenizer.token_to_id("<|im_end|>") in stops and tokenizer.token_to_id("<|endoftext|>") in stops


# ------------------------------------------------------------------------------------------------ data


GSM8K_ROWS = [
    {"question": "Tom has 1,000 apples and buys 234 more. How many?",
     "answer": "He has 1000+234=<<1000+234=1234>>1234 apples.\n#### 1,234"},
    {"question": "What is 2 + 2?", "answer": "2+2=4\n#### 4"},
]


def test_gsm8k_jsonl_parquet_and_directories(tmp_path):
  data_lib.write_jsonl(str(tmp_path / "train.jsonl"), GSM8K_ROWS)
  problems = data_lib.load_problems(str(tmp_path / "train.jsonl"))
  assert [p.answer for p in problems] == ["1234", "4"]
  assert problems[0].solution == "He has 1000+234=1234 apples.\nThe final answer is \\boxed{1234}."
  assert data_lib.load_problems(str(tmp_path), split="train", limit=1) == problems[:1]
  pq = pytest.importorskip("pyarrow.parquet")
  pa = pytest.importorskip("pyarrow")
  os.makedirs(tmp_path / "hf" / "main")
  pq.write_table(pa.Table.from_pylist(GSM8K_ROWS), str(tmp_path / "hf" / "main" / "test-00000-of-00001.parquet"))
  assert data_lib.load_problems(str(tmp_path / "hf"), split="test") == problems


def test_math_style_rows_and_options(tmp_path):
  rows = [{"problem": "Half of 1?", "solution": r"It is \boxed{\frac{1}{2}}.", "status": "ok"},
          {"problem": "Bad", "solution": r"\boxed{0}", "status": "rejected"}]
  data_lib.write_jsonl(str(tmp_path / "math.jsonl"), rows)
  problems = data_lib.load_problems(str(tmp_path / "math.jsonl"), exclude={"status": ["rejected"]})
  assert len(problems) == 1 and problems[0].answer == r"\frac{1}{2}" and problems[0].solution == rows[0]["solution"]
  plain = data_lib.load_problems(str(tmp_path / "math.jsonl"), answer_key="status", answer_format="plain")
  assert [p.answer for p in plain] == ["ok", "rejected"]


def test_data_errors_are_clear(tmp_path):
  with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
    data_lib.load_problems(str(tmp_path / "gsm8k.jsonl"))
  with pytest.raises(FileNotFoundError, match="No 'train' split"):
    data_lib.load_problems(str(tmp_path))
  data_lib.write_jsonl(str(tmp_path / "x.jsonl"), [{"text": "a", "label": "1"}])
  with pytest.raises(KeyError, match="no question field"):
    data_lib.load_problems(str(tmp_path / "x.jsonl"))
  with pytest.raises(KeyError, match="no answer field 'y'"):
    data_lib.load_problems(str(tmp_path / "x.jsonl"), question_key="text", answer_key="y")
  with pytest.raises(FileNotFoundError, match="not prepared"):
    data_lib.load_problems("tfds:maxrl_no_such_dataset:train", data_dir=str(tmp_path))


def test_prepared_tfds_dataset(tmp_path):
  """A TFDS dataset the user prepared (ArrayRecord) reads without TensorFlow, by name or by directory."""
  tfds = pytest.importorskip("tensorflow_datasets")
  pytest.importorskip("array_record")

  class MaxrlTestMath(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, disable_shuffling=True, features=tfds.features.FeaturesDict(
          {"question": tfds.features.Text(), "answer": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"test": self._generate_examples()}

    def _generate_examples(self):
      for i, row in enumerate(GSM8K_ROWS):
        yield i, row

  tfds.disable_progress_bar()
  MaxrlTestMath(data_dir=str(tmp_path)).download_and_prepare(file_format="array_record")
  by_name = data_lib.load_problems("tfds:maxrl_test_math:test", data_dir=str(tmp_path))
  assert [p.answer for p in by_name] == ["1234", "4"]
  by_dir = data_lib.load_problems(f"tfds:{tmp_path / 'maxrl_test_math' / '1.0.0'}", split="test")
  assert by_dir == by_name


def test_prompts_follow_the_paper_and_drop_long_ones(tokenizer_dir):
  tokenizer = tok.TextTokenizer.from_pretrained(tokenizer_dir)
  template = tok.ChatTemplate("chatml")
  problems = [data_lib.Problem("What is 1 + 1?", "2"), data_lib.Problem("x" * 200, "1")]
  text = data_lib.prompt_text(problems[0].question, template)
  assert text == ("<|im_start|>user\nWhat is 1 + 1? Let's think step by step and output the final answer "
                  "within \\boxed{}.<|im_end|>\n<|im_start|>assistant\n")
  ids, kept = data_lib.encode_prompts(problems, tokenizer, template, max_tokens=100)
  assert kept == [0] and tokenizer.decode(ids[0], skip_special_tokens=False) == text


# ------------------------------------------------------------------------------------------------ padding


PAD_CONFIG = dec.DecoderConfig(vocab_size=40, num_layers=1, hidden_size=32, ffn_size=48, num_heads=4,
                               num_kv_heads=2, max_positions=64, init_std=0.2, qk_norm=True,
                               rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8})


@pytest.fixture(scope="module")
def pad_model():
  fns = dec.DecoderFns(PAD_CONFIG)
  return fns, jax.jit(fns.init)(jax.random.key(0))


def test_left_padded_prompts_match_unpadded(pad_model):
  """Logits, prefix-cache decoding and sampled tokens of a left-padded prompt equal the unpadded ones."""
  fns, params = pad_model
  short, long = [5, 6, 7], [9, 8, 7, 6, 5, 4]
  prompts = sampling.left_pad([short, long], length=8)
  np.testing.assert_array_equal(prompts.tokens[0], [0, 0, 0, 0, 0, 5, 6, 7])
  continuation = [[11, 12, 13], [14, 15, 16]]
  padded_logits = jax.jit(fns.forward)(params, prompts.tokens, prompts.attention_mask())
  last, prefix = jax.jit(fns.prefill)(params, prompts.tokens, prompts.attention_mask())
  decoded, _ = jax.jit(fns.decode)(params, jnp.asarray(continuation)[:, None], prefix,
                                   fns.init_suffix_cache(prefix, 1, 3), jnp.int32(0))
  # Unpadded references: each prompt + continuation at positions 0.., right-padded (causality ignores it).
  rows = [prompt + cont for prompt, cont in zip([short, long], continuation)]
  unpadded = jax.jit(fns.forward)(params, jnp.asarray([row + [0] * (9 - len(row)) for row in rows]))
  for row, prompt in enumerate([short, long]):
    n = len(prompt)
    np.testing.assert_allclose(padded_logits[row, 8 - n:], unpadded[row, :n], atol=1e-5)
    np.testing.assert_allclose(last[row], unpadded[row, n - 1], atol=1e-5)
    np.testing.assert_allclose(decoded[row, 0], unpadded[row, n:n + 3], atol=1e-5)

  key = jax.random.key(3)
  options = dict(num_rollouts=4, max_new_tokens=6, temperature=1.0)
  plain = sampling.sample_rollouts(fns, params, jnp.asarray([short]), key, **options)
  padded = sampling.sample_rollouts(fns, params, sampling.left_pad([short], length=8), key, **options)
  np.testing.assert_array_equal(plain.tokens, padded.tokens)
  np.testing.assert_allclose(plain.logprobs, padded.logprobs, atol=1e-5)
  teacher = jax.jit(functools.partial(sampling.sequence_logprobs, fns))(
      params, sampling.left_pad([short] * 4, length=8), padded.tokens[0])
  np.testing.assert_allclose(teacher * padded.mask[0], padded.logprobs[0], atol=1e-5)


def test_micro_batched_update_equals_the_one_batch_update(pad_model):
  fns, params = pad_model
  hyper = step_lib.Hyper(learning_rate=1e-2, b1=0.9, b2=0.95, weight_decay=0.0, entropy_coef=0.01)
  prompts = sampling.left_pad([[5, 6, 7], [9, 8, 7, 6], [1, 2], [3, 3, 3, 3, 3]], length=6)
  rollouts = sampling.sample_rollouts(fns, params, prompts, jax.random.key(1), num_rollouts=4, max_new_tokens=5,
                                      stop_tokens=(3,))
  rewards = jnp.asarray([[1, 0, 0, 1], [0, 0, 0, 0], [1, 1, 1, 0], [0, 1, 0, 0]], jnp.float32)
  # token_mean: the reduction whose micro-batch weights are not uniform (shares of the token count).
  for reduction in ("token_mean",):
    maxrl = estimators.get_advantage_fn("maxrl")
    spec = step_lib.RLSpec(num_samples=4, max_new_tokens=5, stop_tokens=(3,), reduction=reduction, grad_clip=1.0)
    micro_spec = step_lib.RLSpec(num_samples=4, max_new_tokens=5, stop_tokens=(3,), reduction=reduction,
                                 grad_clip=1.0, micro_batch_prompts=2, micro_batch_rollouts=2)
    kwargs = dict(advantage_fn=lambda r, h: maxrl(r))
    reference = step_lib.make_update(spec, fns, hyper, **kwargs)
    micro = step_lib.make_update(micro_spec, fns, hyper, **kwargs)
    tx = step_lib.rl_optimizer(hyper, spec)
    fresh = lambda: step_lib.init_state(jax.tree_util.tree_map(jnp.copy, params), tx)  # donated
    state_a, metrics_a = reference(fresh(), prompts, rollouts, rewards, None, jnp.float32(1.0))
    state_b, metrics_b = micro(fresh(), prompts, rollouts, rewards, None, jnp.float32(1.0))
    for key in ("loss", "grad_norm", "entropy", "pass_rate", "mean_abs_advantage"):
      np.testing.assert_allclose(metrics_a[key], metrics_b[key], rtol=2e-5, atol=1e-6, err_msg=key)
    assert float(metrics_b["logprob_mismatch"]) < 1e-4
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), state_a.params, state_b.params)


# ------------------------------------------------------------------------------------------------ rewards


class _AllCorrect:
  """A verifier stand-in that scores every response 1."""
  last_stats = {"verify_timeouts": 0}

  def __call__(self, texts, references):
    return np.ones(len(texts), np.float32)


@pytest.mark.parametrize("zero_truncated", [False, True])
def test_zero_reward_at_the_length_cap(tokenizer_dir, zero_truncated):
  """With zero_truncated, a response whose length reaches max_new_tokens scores 0 whether or not its last
  token was the stop token (verl's zero_reward_on_max_response_length); shorter ones keep their reward."""
  tokenizer = tok.TextTokenizer.from_pretrained(tokenizer_dir)
  config = gsm8k_smollm2.get_config("tiny")
  config.verifier.zero_truncated = zero_truncated
  task = text_task.TextTask(config)
  task.tokenizer, task.verifier = tokenizer, _AllCorrect()
  max_new_tokens = 6
  lengths = np.asarray([[2, 6, 6, 5]], np.int32)  # [P=1, N=4]
  stopped = np.asarray([[True, True, False, False]])
  tokens = np.full((1, 4, max_new_tokens), tokenizer.pad_id, np.int32)
  rewards, result = task.score(["7"], tokens, lengths)
  expected = [[1, 0, 0, 1]] if zero_truncated else [[1, 1, 1, 1]]
  np.testing.assert_array_equal(rewards, expected)
  del stopped
  np.testing.assert_array_equal(result["zeroed_at_cap"], np.asarray(expected) == 0)


# ------------------------------------------------------------------------------------------------ trainer


_E2E_SCRIPT = """
import json, os, sys
import jax
sys.path.insert(0, {repo!r})
from configs import gsm8k_smollm2
from maxrl_jax import train
config = gsm8k_smollm2.get_config("tiny")
config.mesh.shape = (1, 2)  # parameters and optimizer state split over 2 devices, prompts too
first = train.train_and_evaluate(config, {workdir!r})
os.remove(os.path.join({workdir!r}, "summary.json"))  # not finished: it resumes from the sharded checkpoint
again = train.train_and_evaluate(config, {workdir!r})  # the last checkpoint is at the end: nothing new
json.dump({{"first": first, "again": again, "devices": len(jax.devices())}}, open({out!r}, "w"))
"""


def test_tiny_gsm8k_run_end_to_end_sharded(tmp_path):
  """configs/gsm8k_smollm2.py:tiny from checkpoint writing to summary, on 2 devices with FSDP, resumed."""
  workdir, out = str(tmp_path / "run"), str(tmp_path / "out.json")
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0")
  result = subprocess.run([sys.executable, "-c", _E2E_SCRIPT.format(repo=REPO, workdir=workdir, out=out)],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "after RL (maxrl, 4 steps)" in result.stdout
  with open(out) as f:
    outputs = json.load(f)
  summary = outputs["first"]
  assert outputs["devices"] == 2
  for name in ("config.json", "metrics.jsonl", "summary.json", "synthetic_model/model.safetensors",
               "synthetic_model/tokenizer.json", "synthetic_data/train.jsonl", "checkpoints/rl/4",
               "checkpoints/sft/40"):
    assert os.path.exists(os.path.join(workdir, name)), name
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  assert {r["phase"] for r in records} == {"sft", "rl", "eval"}
  rl = [r for r in records if r["phase"] == "rl"]
  assert [r["step"] for r in rl] == [2, 4]
  for record in rl:
    assert 0 <= record["pass_rate"] <= 1 and record["logprob_mismatch"] < 1e-3 and record["verify_timeouts"] == 0
  assert [r["step"] for r in records if r["phase"] == "eval"] == [0, 4]
  sft = [r for r in records if r["phase"] == "sft"]
  assert sft[-1]["loss"] < sft[0]["loss"]
  assert summary["objective"] == "maxrl" and set(summary["eval"]) >= {"pass@1", "pass@4", "pass@8", "maj@8"}
  assert summary["initial_eval"]["pass@8"] > 0  # the SFT warm-up makes the random model answer some
  with open(os.path.join(workdir, "summary.json")) as f:
    assert json.load(f)["eval"] == summary["eval"]
  # The re-run resumed from the last checkpoint: same summary, no new records.
  assert outputs["again"]["eval"] == summary["eval"] and outputs["again"]["rl_steps"] == 4
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    assert len(f.readlines()) == len(records)
  config = gsm8k_smollm2.get_config("tiny")
  config.rollout.num_samples = 8
  with pytest.raises(ValueError, match="different config"):
    train.train_and_evaluate(config, workdir)


def test_registered_as_a_task_and_presets_validate():
  assert "text" in tasks_base.available()
  for module, presets in ((gsm8k_smollm2, ("paper", "smoke", "tiny")), (qwen3_math, ("paper", "4b", "tiny"))):
    for preset in presets:
      config = module.get_config(preset)
      assert config.task == "text"
      if not config.model.synthetic:
        config.model.path, config.data.train_path = "/models/x", "/data/x"
      train.validate_config(config)
  paper = gsm8k_smollm2.get_config()
  assert (paper.rollout.num_prompts, paper.rollout.num_samples, paper.rl.learning_rate,
          paper.rollout.max_new_tokens, max(paper.eval.ks)) == (256, 128, 1e-5, 2048, 1024)
  qwen = qwen3_math.get_config()
  assert (qwen.rollout.num_samples, qwen.rl.learning_rate, qwen.rollout.max_new_tokens) == (16, 1e-6, 4096)
  assert qwen3_math.get_config("tiny").model.synthetic == "qwen3"


def test_paper_presets_follow_the_official_scripts():
  """smollm/smollm.sh and qwen3_experiments/run_qwen3_training.sh of tajwarfahim/maxrl, with verl defaults."""
  paper, qwen = gsm8k_smollm2.get_config(), qwen3_math.get_config()
  for config in (paper, qwen):
    assert config.objective.reduction == "token_mean"
    assert (config.rl.b1, config.rl.b2, config.rl.weight_decay, config.rl.warmup_steps) == (0.9, 0.999, 0.01, 0)
    assert (config.eval.temperature, config.eval.top_p, config.eval.periodic_num_samples) == (0.6, 0.95, 32)
    assert config.rollout.temperature == 1.0
  assert (paper.rl.grad_clip, paper.data.max_prompt_tokens, paper.verifier.zero_truncated) == (1.0, 512, True)
  assert paper.data.prompt_suffix == " Let's think step by step and output the final answer within \\boxed{}."
  assert (paper.eval.every_steps, paper.eval.num_samples) == (100, 1024)
  assert (qwen.rl.grad_clip, qwen.data.max_prompt_tokens, qwen.verifier.zero_truncated) == (0.3, 1024, False)
  assert qwen.data.prompt_suffix == "\nPlease reason step by step, and put your final answer within \\boxed{{}}."
  assert qwen.eval.every_steps == 50
  # Periodic evaluations use 32 samples and the ks that fit; the first and last use all of them.
  assert text_task.eval_sizes(paper, full=False) == {"num_samples": 32, "samples_per_call": 32,
                                                      "ks": (1, 2, 4, 8, 16, 32)}
  assert text_task.eval_sizes(paper, full=True) == {"num_samples": 1024, "samples_per_call": 128,
                                                     "ks": tuple(paper.eval.ks)}
  tiny = gsm8k_smollm2.get_config("tiny")
  assert text_task.eval_sizes(tiny, full=False) == text_task.eval_sizes(tiny, full=True)
  assert not tiny.verifier.zero_truncated


@pytest.mark.parametrize("field, value, match", [
    ("model.path", "", "model.path"),
    ("rollout.prompt_chunk", 3, "rollout.prompt_chunk"),
    ("rl.micro_batch_rollouts", 3, "rl.micro_batch_rollouts"),
    ("eval.ks", (1, 16), "eval.ks"),
    ("data.chat_template", "llama9", "data.chat_template"),
    ("objective.name", "ppo", "objective.name"),
    ("verifier.answer_mode", "last_number", "verifier.answer_mode"),
    ("eval.periodic_num_samples", 16, "eval.periodic_num_samples"),
    ("eval.periodic_num_samples", 6, "eval.periodic_num_samples"),
    ("verifier.memory_limit_mb", -1, "verifier.memory_limit_mb"),
])
def test_invalid_config_is_named(field, value, match):
  config = gsm8k_smollm2.get_config("tiny")
  if field == "model.path":
    config.model.synthetic = ""
  node = config
  *parents, leaf = field.split(".")
  for part in parents:
    node = node[part]
  node[leaf] = value
  with pytest.raises(ValueError, match=match):
    train.validate_config(config)


# ------------------------------------------------------------------------------------------------ population

LM_OBJECTIVES = ("ds: objective.name=grpo, objective.smoothing_gamma=0.05",
                 "self: objective.name=grpo, objective.self_filter=True")


def test_population_of_smoothing_and_self_on_the_language_model_resumes_exactly(tmp_path):
  """configs/gsm8k_smollm2.py:tiny as 2 objectives (Differential Smoothing, SELF) x 2 seeds: sampling and the
  update vmapped over the members, the host verifier between them; resumed after losing its last RL
  checkpoint, it ends with the records of the uninterrupted population."""
  import shutil  # pylint: disable=import-outside-toplevel

  from maxrl_jax import run_logging  # pylint: disable=import-outside-toplevel

  config = gsm8k_smollm2.get_config("tiny")
  config.logging.tensorboard = False
  config.logging.plots = False
  config.population.objectives = LM_OBJECTIVES
  config.population.seeds = (0, 1)
  workdir = tmp_path / "population"
  summary = train.train_and_evaluate(config, str(workdir))
  assert [m["name"] for m in summary["members"]] == ["ds/seed0", "ds/seed1", "self/seed0", "self/seed1"]
  records = run_logging.MetricsWriter(str(workdir)).read()
  rl = [r for r in records if r["phase"] == "rl"]
  assert sorted({r["member"] for r in rl}) == [0, 1, 2, 3]
  assert all(("greedy_solved_fraction" in r) for r in rl)
  assert all(r["greedy_solved_fraction"] == 0 for r in rl if r["objective"] == "ds")  # SELF off for ds
  assert all(r["logprob_mismatch"] < 1e-4 for r in rl)
  # Seeds differ (their SFT data and RL prompts), a seed's two members share its SFT policy.
  initial = {m["name"]: m["initial_eval"] for m in summary["members"]}
  assert initial["ds/seed0"] == initial["self/seed0"] and initial["ds/seed1"] == initial["self/seed1"]

  resumed = tmp_path / "resumed"
  shutil.copytree(workdir, resumed)
  shutil.rmtree(resumed / "checkpoints" / "rl" / "4")
  (resumed / "summary.json").unlink()
  train.train_and_evaluate(config, str(resumed))
  strip = lambda rs: [{k: v for k, v in r.items() if k not in ("step_time_s", "tokens_per_s", "sample_verify_s",
                                                                  "verify_s")} for r in rs]
  assert strip(run_logging.MetricsWriter(str(resumed)).read()) == strip(records)
