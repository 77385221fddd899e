"""Damaged Hugging Face checkpoint files give errors that name the file and the fix: config / index /
tokenizer files that are not JSON, truncated safetensors, impossible header lengths, config.json without
required fields. Every bad file is written under tmp_path; nothing is downloaded. (Faults of a training run
are the harness's: tests/test_harness_faults.py.)
"""

import json
import os
import re
import struct

import numpy as np
import pytest

from maxrl_jax.models import hf_loading
from maxrl_jax.text import synthetic
from maxrl_jax.text import tokenizer as tok


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
