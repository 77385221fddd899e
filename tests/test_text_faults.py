"""Faults of the text path. Damaged checkpoint files give errors that name the file and the fix: config / index /
tokenizer files that are not JSON, truncated safetensors, impossible header lengths, config.json without
required fields. Every bad file is written under tmp_path; nothing is downloaded.

Faults of a text training run (configs/gsm8k_smollm2.py:tiny): no fault may lose records or report a wrong
result. One finished tiny run is made once; each test copies its workdir, injects one fault and re-runs.
"""

import json
import os
import re
import shutil
import struct
import sys

import numpy as np
import pytest

from maxrl_jax import checkpoints
from maxrl_jax import training_loop
from maxrl_jax import workdir as workdir_lib
from maxrl_jax.models import hf_loading
from maxrl_jax.text import synthetic
from maxrl_jax.text import tokenizer as tok
from maxrl_jax.text import train as text_train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from configs import gsm8k_smollm2  # noqa: E402
import run_files  # noqa: E402  (tests/run_files.py)

SMALL = dict(num_layers=1, hidden_size=32, ffn_size=48, num_heads=2, num_kv_heads=1)


@pytest.fixture
def checkpoint(tmp_path):
  path = str(tmp_path / "ckpt")
  synthetic.write_tiny_checkpoint(path, architecture="llama", **SMALL)
  return path


def _names(path):
  """A pytest.raises match for a message that names `path`."""
  return re.escape(path)


NOT_JSON = '{bad: "json"'  # the tokenizers parser reports "key must be a string at line 1 column 2"


def test_config_that_is_not_json_is_named(checkpoint):
  config_path = os.path.join(checkpoint, "config.json")
  with open(config_path, "w") as f:
    f.write(NOT_JSON)
  for load in (hf_loading.load_pretrained, hf_loading.load_pretrained_config):
    with pytest.raises(ValueError, match=_names(config_path) + ".*not valid JSON.*restore it"):
      load(checkpoint)
  with pytest.raises(ValueError, match=_names(config_path)):  # the tokenizer reads config.json for eos ids
    tok.TextTokenizer.from_pretrained(checkpoint)
  with open(config_path, "wb") as f:
    f.write(b"\xff\xfe\x00binary")
  with pytest.raises(ValueError, match=_names(config_path) + ".*not UTF-8"):
    hf_loading.load_pretrained(checkpoint)
  with open(config_path, "w") as f:
    f.write("[1, 2]")
  with pytest.raises(ValueError, match=_names(config_path) + ".*JSON list, not an object"):
    hf_loading.load_pretrained(checkpoint)


def test_index_that_is_not_json_is_named(tmp_path):
  path = str(tmp_path / "sharded")
  config = synthetic.write_tiny_checkpoint(path, architecture="llama", **SMALL)
  model, params = hf_loading.load_pretrained(path)
  hf_loading.save_pretrained(path, config, params, architecture="llama", max_shard_bytes=20_000)
  index_path = os.path.join(path, "model.safetensors.index.json")
  with open(index_path, "w") as f:
    f.write(NOT_JSON)
  with pytest.raises(ValueError, match=_names(index_path) + ".*not valid JSON"):
    hf_loading.load_pretrained(path)
  with open(index_path, "w") as f:
    json.dump({"metadata": {}}, f)
  with pytest.raises(ValueError, match=_names(index_path) + '.*no "weight_map"'):
    hf_loading.load_pretrained(path)
  del model


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json", "generation_config.json"])
def test_tokenizer_files_that_are_not_json_are_named(checkpoint, name):
  path = os.path.join(checkpoint, name)
  with open(path, "w") as f:
    f.write(NOT_JSON)
  with pytest.raises(ValueError, match=_names(path) + ".*restore it"):
    tok.TextTokenizer.from_pretrained(checkpoint)
  if name == "tokenizer_config.json":
    with pytest.raises(ValueError, match=_names(path)):
      tok.ChatTemplate.from_pretrained(checkpoint)


def test_truncated_safetensors_is_named(checkpoint):
  weights = os.path.join(checkpoint, "model.safetensors")
  size = os.path.getsize(weights)
  with open(weights, "r+b") as f:
    f.truncate(size - 1000)
  for load in (hf_loading.load_pretrained, lambda p: hf_loading.read_safetensors(weights)):
    with pytest.raises(ValueError, match=_names(weights) + " is truncated: tensor .* re-download or re-save"):
      load(checkpoint)
  # Cut inside the JSON header.
  with open(weights, "r+b") as f:
    f.truncate(40)
  with pytest.raises(ValueError, match=_names(weights) + ".*header of \\d+ bytes but the file has 40 bytes"):
    hf_loading.load_pretrained(checkpoint)


def test_impossible_header_length_is_named(tmp_path):
  weights = str(tmp_path / "model.safetensors")
  with open(weights, "wb") as f:
    f.write(struct.pack("<Q", 2**62) + b'{"a": 1}')
  with pytest.raises(ValueError, match=_names(weights) + ".*header of 4611686018427387904 bytes"):
    hf_loading.read_safetensors(weights)


def test_malformed_safetensors_header_entries_are_named(tmp_path):
  weights = str(tmp_path / "x.safetensors")
  hf_loading.write_safetensors(weights, {"w": np.zeros((2, 2), np.float32)})
  for entry, match in [({"dtype": "F32", "shape": [2, 2]}, "malformed"),
                       ({"dtype": "F32", "shape": [2, 2], "data_offsets": [16, 0]}, "data offsets"),
                       ([1, 2], "malformed")]:
    header = json.dumps({"w": entry}).encode()
    with open(weights, "wb") as f:
      f.write(struct.pack("<Q", len(header)) + header + bytes(16))
    with pytest.raises(ValueError, match=_names(weights) + ".*" + match):
      hf_loading.read_safetensors(weights)
  header = b"[]"
  with open(weights, "wb") as f:
    f.write(struct.pack("<Q", len(header)) + header)
  with pytest.raises(ValueError, match=_names(weights) + ".*not a JSON object"):
    hf_loading.read_safetensors(weights)


def test_config_without_required_fields_is_named(checkpoint):
  config_path = os.path.join(checkpoint, "config.json")
  with open(config_path) as f:
    config = json.load(f)
  del config["hidden_size"]
  with open(config_path, "w") as f:
    json.dump(config, f)
  for load in (hf_loading.load_pretrained, hf_loading.load_pretrained_config):
    with pytest.raises(ValueError, match=_names(config_path) + r" lacks \['hidden_size'\], which a llama model"):
      load(checkpoint)
  config["hidden_size"] = "32"
  with open(config_path, "w") as f:
    json.dump(config, f)
  with pytest.raises(ValueError, match=_names(config_path) + ": hidden_size='32' must be a positive integer"):
    hf_loading.load_pretrained(checkpoint)
  with pytest.raises(ValueError, match=r"config.json lacks \['vocab_size'\]"):  # a dict: the generic name
    hf_loading.decoder_config_from_hf({"architectures": ["LlamaForCausalLM"], "hidden_size": 32,
                                       "intermediate_size": 48, "num_hidden_layers": 1, "num_attention_heads": 2})


# ------------------------------------------------------------------------------------------------ training run


TIMING_FIELDS = ("step_time_s", "tokens_per_s", "sample_verify_s", "verify_s")


def tiny_config(**overrides):
  return run_files.with_overrides(gsm8k_smollm2.get_config("tiny"), overrides)


_metrics = run_files.metrics


def _deterministic(records):
  return run_files.without(records, TIMING_FIELDS)


_summary = run_files.summary


_flip_bytes = run_files.flip_bytes


_largest_file = run_files.largest_file


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("finished") / "run")
  text_train.train_and_evaluate(tiny_config(), workdir)
  return workdir


@pytest.fixture
def copy(finished, tmp_path):
  def make():
    target = str(tmp_path / "run")
    shutil.copytree(finished, target)
    os.remove(os.path.join(target, "summary.json"))  # An interrupted run: not finished yet.
    return target
  return make


def test_run_deleted_metrics_are_rebuilt_from_the_checkpoint(finished, copy, capsys):
  workdir = copy()
  os.remove(os.path.join(workdir, "metrics.jsonl"))
  summary = text_train.train_and_evaluate(tiny_config(), workdir)
  assert "rebuilt from the checkpoint" in capsys.readouterr().out
  original = _summary(finished)
  assert summary["rl_steps"] == 4 and summary["config_sha256"] == original["config_sha256"]
  assert summary["initial_eval"] == original["initial_eval"] and summary["eval"] == original["eval"]
  assert _metrics(workdir) == _metrics(finished)


def test_run_corrupted_checkpoint_falls_back_to_the_previous_good_one(finished, copy):
  workdir = copy()
  _flip_bytes(_largest_file(os.path.join(workdir, "checkpoints", "rl", "4")))
  with pytest.warns(UserWarning, match=r"checkpoint .*rl/4 is corrupt"):
    summary = text_train.train_and_evaluate(tiny_config(), workdir)
  # Resumed from RL step 2 and redid steps 3-4: the same result as the uninterrupted run.
  assert summary["eval"] == _summary(finished)["eval"]
  assert _deterministic(_metrics(workdir)) == _deterministic(_metrics(finished))
  assert any(name.startswith("corrupt-4-") for name in os.listdir(os.path.join(workdir, "checkpoints", "rl")))


def test_run_another_config_cannot_adopt_the_checkpoints_even_without_config_json(copy):
  workdir = copy()
  os.remove(os.path.join(workdir, "config.json"))
  with pytest.raises(checkpoints.CheckpointError, match=r"another config \(objective.name: 'maxrl' -> 'grpo'"):
    text_train.train_and_evaluate(tiny_config(**{"objective.name": "grpo"}), workdir)


def test_run_rerunning_a_finished_run_changes_nothing(finished, capsys):
  files = lambda: {os.path.relpath(os.path.join(r, n), finished): os.path.getmtime(os.path.join(r, n))
                   for r, _, ns in os.walk(finished) for n in ns if n != workdir_lib.LOCK_FILE}
  before = files()
  text = open(os.path.join(finished, "summary.json")).read()
  summary = text_train.train_and_evaluate(tiny_config(), finished)
  assert "already holds this run, finished" in capsys.readouterr().out
  assert files() == before and open(os.path.join(finished, "summary.json")).read() == text
  assert summary == json.loads(text)


def test_run_on_a_busy_workdir_stops_at_once(tmp_path):
  workdir = str(tmp_path / "run")
  os.makedirs(workdir)
  with workdir_lib.WorkdirLock(workdir):
    with pytest.raises(workdir_lib.WorkdirBusyError, match="is in use by another run"):
      text_train.train_and_evaluate(tiny_config(), workdir)
  assert os.listdir(workdir) == [workdir_lib.LOCK_FILE]


@pytest.mark.parametrize("overrides", [{"sft.learning_rate": float("inf")},
                                       {"rl.learning_rate": float("inf"), "sft.steps": 2}])
def test_run_diverged_stops_naming_the_step_and_the_quantity(tmp_path, overrides):
  workdir = str(tmp_path / "run")
  phase = "sft" if "sft.learning_rate" in overrides else "rl"
  with pytest.raises(training_loop.NonFiniteError, match=rf"{phase} diverged: .* is (nan|inf|not finite) at step \d+"):
    text_train.train_and_evaluate(tiny_config(**overrides), workdir)
  assert not os.path.exists(os.path.join(workdir, "summary.json"))
  directory = os.path.join(workdir, "checkpoints", phase)
  assert not [s for s in os.listdir(directory) if s.isdigit()]  # Nothing after the divergence was saved.
