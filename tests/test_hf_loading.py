"""Hugging Face checkpoints -> our decoder: logits equal transformers' (full forward and KV cache), round
trips, sharded files, bf16 files, placement on a mesh, and errors that name what is wrong.

The transformers tests write tiny random checkpoints with transformers itself and skip when torch or
transformers is missing (CI installs the CPU wheels). Everything else needs neither.
"""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxrl_jax.models import decoder as dec
from maxrl_jax.models import hf_loading
from maxrl_jax.models import load_pretrained, save_pretrained

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One tiny model per architecture, covering every mapped feature: tied and untied embeddings, Qwen2's
# q/k/v biases, Llama's o_proj and MLP biases, Qwen3's q/k norm and head_dim != hidden / heads, GQA, and
# the llama3 / yarn / linear RoPE variants; qwen2 is also written as a sharded checkpoint.
COMMON = dict(vocab_size=67, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6)
HF_CASES = {
    "llama": ("LlamaConfig", dict(tie_word_embeddings=True, rope_theta=100.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16})),
    "llama_biases": ("LlamaConfig", dict(tie_word_embeddings=False, attention_bias=True, mlp_bias=True,
                                         num_key_value_heads=4)),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True, rope_scaling={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32})),
    "qwen3": ("Qwen3Config", dict(tie_word_embeddings=False, head_dim=16, num_key_value_heads=1,
                                  rope_scaling={"rope_type": "linear", "factor": 2.0})),
}


def _transformers():
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  return torch, transformers


@pytest.fixture(scope="module", params=sorted(HF_CASES))
def hf_model(request, tmp_path_factory):
  """(case name, transformers model in float32 eval mode, checkpoint directory)."""
  torch, transformers = _transformers()
  class_name, extra = HF_CASES[request.param]
  config = getattr(transformers, class_name)(**{**COMMON, **extra})
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(config).eval()
  with torch.no_grad():
    for parameter in model.parameters():  # Non-trivial norms and biases, not HF's ones / zeros.
      parameter.normal_(0.0, 0.3)
  path = str(tmp_path_factory.mktemp(request.param))
  model.save_pretrained(path, max_shard_size="20KB" if request.param == "qwen2" else "10GB")
  return request.param, model, path


def _hf_logits(model, tokens):
  import torch  # pylint: disable=import-outside-toplevel
  with torch.no_grad():
    return model(torch.tensor(np.asarray(tokens), dtype=torch.long)).logits.numpy()


def _tokens(seed, shape, vocab=COMMON["vocab_size"]):
  return np.random.RandomState(seed).randint(0, vocab, shape)


def test_logits_match_transformers(hf_model):
  name, model, path = hf_model
  if name == "qwen2":
    assert os.path.exists(os.path.join(path, "model.safetensors.index.json"))  # sharded
  flax_model, params = load_pretrained(path)
  config = flax_model.config
  assert config.tie_embeddings == model.config.tie_word_embeddings
  assert config.qk_norm == (name == "qwen3")
  assert (config.rope_scaling is not None) == (name != "llama_biases")
  tokens = _tokens(1, (2, 37))
  logits = jax.jit(flax_model.apply)({"params": params}, jnp.asarray(tokens))
  assert logits.shape == (2, 37, COMMON["vocab_size"]) and logits.dtype == jnp.float32
  np.testing.assert_allclose(logits, _hf_logits(model, tokens), atol=2e-4, rtol=1e-4)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers 5 renames past_key_values
def test_kv_cache_logits_match_transformers_cache(hf_model):
  """Our prefill + stepwise decode equals transformers' incremental decoding with its own KV cache."""
  import torch  # pylint: disable=import-outside-toplevel
  _, model, path = hf_model
  flax_model, params = load_pretrained(path)
  fns = dec.DecoderFns(flax_model.config)
  prompt_len, new = 9, 6
  tokens = _tokens(2, (2, prompt_len + new))
  with torch.no_grad():
    out = model(torch.tensor(tokens[:, :prompt_len]), use_cache=True)
    hf_steps, cache = [out.logits[:, -1].numpy()], out.past_key_values
    for t in range(prompt_len, prompt_len + new - 1):
      out = model(torch.tensor(tokens[:, t:t + 1]), past_key_values=cache, use_cache=True)
      hf_steps.append(out.logits[:, -1].numpy())
      cache = out.past_key_values
  hf_steps = np.stack(hf_steps, axis=1)  # [B, new, V]: logits after the prompt and each new token
  np.testing.assert_allclose(hf_steps, _hf_logits(model, tokens)[:, prompt_len - 1:-1], atol=2e-4)

  # Our cache path: the prompt pass, then the new tokens through decode against the prefix and suffix
  # caches (all at once; tests/test_decoder.py shows one-at-a-time decoding equals this).
  last, prefix = jax.jit(fns.prefill)(params, jnp.asarray(tokens[:, :prompt_len]))
  suffix = fns.init_suffix_cache(prefix, 1, new - 1)
  rest, _ = jax.jit(fns.decode)(params, jnp.asarray(tokens[:, None, prompt_len:-1]), prefix, suffix,
                                jnp.int32(0))
  ours = np.concatenate([np.asarray(last)[:, None], np.asarray(rest)[:, 0]], axis=1)
  np.testing.assert_allclose(ours, hf_steps, atol=2e-4, rtol=1e-4)


def test_transformers_loads_our_export(hf_model, tmp_path):
  """save_pretrained writes a checkpoint transformers reads back to the same logits."""
  _, transformers = _transformers()
  name, model, path = hf_model
  flax_model, params = load_pretrained(path)
  arch = name.split("_")[0]
  save_pretrained(str(tmp_path), flax_model.config, params, architecture=arch)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
  tokens = _tokens(3, (1, 21))
  np.testing.assert_allclose(_hf_logits(reloaded, tokens), _hf_logits(model, tokens), atol=1e-5)


def test_bfloat16_checkpoint(tmp_path):
  """bf16 safetensors (how Qwen3 ships) load exactly into float32, and into bf16 parameters."""
  torch, transformers = _transformers()
  config = transformers.Qwen3Config(**{**COMMON, "head_dim": 8, "tie_word_embeddings": True})
  torch.manual_seed(1)
  model = transformers.AutoModelForCausalLM.from_config(config).eval()
  model.to(torch.bfloat16).save_pretrained(str(tmp_path))
  assert all(v.dtype == jnp.bfloat16 for v in hf_loading.read_checkpoint_tensors(str(tmp_path)).values())
  flax_model, params = load_pretrained(str(tmp_path))
  tokens = _tokens(4, (2, 17))
  expected = _hf_logits(model.float(), tokens)
  np.testing.assert_allclose(flax_model.apply({"params": params}, jnp.asarray(tokens)), expected, atol=2e-4)
  bf16_model, bf16_params = load_pretrained(str(tmp_path), dtype="bfloat16")
  assert bf16_model.config.dtype == jnp.bfloat16
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves(bf16_params))
  np.testing.assert_array_equal(  # bf16 weights are read bit-exactly
      bf16_params["norm"]["scale"], np.asarray(model.model.norm.weight.detach().float().numpy(), jnp.bfloat16))


# ------------------------------------------------------------------------------------------------ no torch


def _tiny(architecture, **overrides):
  values = dict(vocab_size=40, num_layers=2, hidden_size=32, ffn_size=48, num_heads=4, num_kv_heads=2,
                max_positions=64, init_std=0.2, tie_embeddings=architecture != "qwen3",
                qk_norm=architecture == "qwen3", attention_bias=architecture == "qwen2")
  values.update(overrides)
  return dec.DecoderConfig(**values)


@pytest.mark.parametrize("architecture, max_shard_bytes", [("llama", None), ("qwen2", 4000), ("qwen3", None)])
def test_save_load_round_trip_is_exact(architecture, max_shard_bytes, tmp_path):
  config = _tiny(architecture, rope_scaling={"rope_type": "yarn", "factor": 2.0,
                                             "original_max_position_embeddings": 32})
  params = dec.init_params(config, jax.random.key(0))
  save_pretrained(str(tmp_path), config, params, architecture=architecture, max_shard_bytes=max_shard_bytes)
  assert os.path.exists(tmp_path / "model.safetensors.index.json") == (max_shard_bytes is not None)
  model, loaded = load_pretrained(str(tmp_path), max_positions=64)
  assert model.config == dataclasses.replace(config, init_std=model.config.init_std)
  jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, params)


def test_safetensors_reader_and_writer_agree_with_the_safetensors_package(tmp_path):
  st = pytest.importorskip("safetensors.numpy")
  arrays = {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b.c": np.array([1, -2], np.int64),
            "h": np.ones((2, 2), np.float16)}
  st.save_file(arrays, str(tmp_path / "x.safetensors"))
  read = hf_loading.read_safetensors(str(tmp_path / "x.safetensors"))
  assert sorted(read) == sorted(arrays)
  for name, array in arrays.items():
    np.testing.assert_array_equal(read[name], array)
    assert read[name].dtype == array.dtype
  hf_loading.write_safetensors(str(tmp_path / "y.safetensors"), arrays)
  for name, array in st.load_file(str(tmp_path / "y.safetensors")).items():
    np.testing.assert_array_equal(array, arrays[name])


def test_load_places_bfloat16_and_tied_embeddings(tmp_path):
  config = _tiny("llama")
  params = dec.init_params(config, jax.random.key(1))
  save_pretrained(str(tmp_path), config, params, architecture="llama")
  model, loaded = load_pretrained(str(tmp_path), dtype="bfloat16", param_dtype="float32")
  assert model.config.dtype == jnp.bfloat16 and model.config.param_dtype == jnp.float32
  assert "lm_head" not in loaded
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(loaded))
  _, bf16 = load_pretrained(str(tmp_path), dtype="bfloat16")
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves(bf16))


def _write(tmp_path, architecture="llama", **config_overrides):
  config = _tiny(architecture)
  save_pretrained(str(tmp_path), config, dec.init_params(config, jax.random.key(0)), architecture=architecture)
  if config_overrides:
    path = tmp_path / "config.json"
    hf_config = json.loads(path.read_text())
    hf_config.update(config_overrides)
    path.write_text(json.dumps(hf_config))
  return config


def _rewrite_tensors(tmp_path, edit):
  tensors = {k: np.array(v) for k, v in hf_loading.read_safetensors(str(tmp_path / "model.safetensors")).items()}
  edit(tensors)
  hf_loading.write_safetensors(str(tmp_path / "model.safetensors"), tensors)


def test_missing_tensor_is_named(tmp_path):
  _write(tmp_path)
  _rewrite_tensors(tmp_path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
  with pytest.raises(ValueError, match=r"missing tensors \['model.layers.1.mlp.up_proj.weight'\]"):
    load_pretrained(str(tmp_path))


def test_unexpected_and_misshaped_tensors_are_named(tmp_path):
  _write(tmp_path)

  def edit(tensors):
    tensors["model.layers.0.self_attn.q_proj.bias"] = np.zeros(32, np.float32)  # Llama has none
    tensors["model.norm.weight"] = np.zeros(31, np.float32)
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.zeros(4, np.float32)  # ignored buffer

  _rewrite_tensors(tmp_path, edit)
  with pytest.raises(ValueError, match=r"unexpected tensors \['model.layers.0.self_attn.q_proj.bias'\]"
                     r".*misshaped tensors \['model.norm.weight: \(31,\), expected \(32,\)'\]"):
    load_pretrained(str(tmp_path))


@pytest.mark.parametrize("overrides, error, match", [
    ({"architectures": ["MistralForCausalLM"], "model_type": "mistral"}, ValueError,
     r"Unsupported architecture \['MistralForCausalLM'\]"),
    ({"use_sliding_window": True}, ValueError, "use_sliding_window"),
    ({"layer_types": ["full_attention", "sliding_attention"]}, ValueError, "sliding_attention"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, ValueError, "Unsupported RoPE scaling type 'dynamic'"),
    ({"hidden_act": "gelu"}, ValueError, "hidden_act='gelu'"),
])
def test_unsupported_configs_are_named(tmp_path, overrides, error, match):
  _write(tmp_path, **overrides)
  with pytest.raises(error, match=match):
    load_pretrained(str(tmp_path))


def test_missing_files_are_explained(tmp_path):
  with pytest.raises(FileNotFoundError, match="never downloaded"):
    load_pretrained(str(tmp_path / "nope"))
  with pytest.raises(FileNotFoundError, match="config.json"):
    load_pretrained(str(tmp_path))
  (tmp_path / "config.json").write_text(json.dumps(hf_loading.hf_config_dict(_tiny("llama"), "llama")))
  (tmp_path / "pytorch_model.bin").write_text("")
  with pytest.raises(FileNotFoundError, match="safe_serialization"):
    load_pretrained(str(tmp_path))


def test_transformers5_rope_parameters_layout(tmp_path):
  """config.json of transformers >= 5 keeps theta and scaling in rope_parameters."""
  _write(tmp_path, rope_scaling=None, rope_parameters={"rope_type": "linear", "factor": 3.0, "rope_theta": 500.0})
  hf_config = json.loads((tmp_path / "config.json").read_text())
  del hf_config["rope_theta"]
  (tmp_path / "config.json").write_text(json.dumps(hf_config))
  model, _ = load_pretrained(str(tmp_path))
  assert model.config.rope_theta == 500.0
  assert dict(model.config.rope_scaling) == {"rope_type": "linear", "factor": 3.0}


def test_placement_on_a_mesh_reads_shards(tmp_path):
  """With 4 CPU devices: every parameter lands with the requested sharding and the same values."""
  config = _tiny("qwen3", ffn_size=64)
  save_pretrained(str(tmp_path), config, dec.init_params(config, jax.random.key(2)), architecture="qwen3")
  script = textwrap.dedent(f"""
      import jax, numpy as np
      from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
      from maxrl_jax.models import load_pretrained
      mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "model"))
      def rules(shapes):
          def spec(x):
              if x.ndim == 2 and x.shape[1] % 2 == 0:
                  return NamedSharding(mesh, P("data", "model") if x.shape[0] % 2 == 0 else P(None, "model"))
              return NamedSharding(mesh, P())
          return jax.tree_util.tree_map(spec, shapes)
      _, sharded = load_pretrained({str(tmp_path)!r}, shardings=rules)
      _, plain = load_pretrained({str(tmp_path)!r})
      up = sharded["layers_0"]["mlp"]["up_proj"]["kernel"]
      assert len(jax.devices()) == 4, jax.devices()
      assert up.sharding.spec == P("data", "model"), up.sharding
      assert [s.data.shape for s in up.addressable_shards] == [(16, 32)] * 4
      jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), sharded, plain)
      print("OK")
  """)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=120)
  assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-2000:]
