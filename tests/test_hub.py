"""Hugging Face Hub ids (maxrl_jax/text/hub.py) resolved from a cache these tests write themselves, without a
network: the cache layout of huggingface_hub (<repo type>s--OWNER--NAME/snapshots/<commit>/..., refs/main),
offline (HF_HUB_OFFLINE=1) and online with the Hub unreachable, the errors, and the text task reading a model
and GSM8K through Hub ids."""

import os
import sys

import pytest

from maxrl_jax.text import hub

COMMIT = "0123456789abcdef0123456789abcdef01234567"
MODEL_ID = "HuggingFaceTB/SmolLM2-360M-Instruct"


def cache_repo(cache: str, repo_type: str, repo_id: str, files: dict[str, str]) -> str:
  """Writes a repository into a huggingface_hub cache (plain files in the snapshot); returns the snapshot."""
  storage = os.path.join(cache, f"{repo_type}s--{repo_id.replace('/', '--')}")
  snapshot = os.path.join(storage, "snapshots", COMMIT)
  for name, text in files.items():
    os.makedirs(os.path.dirname(os.path.join(snapshot, name)), exist_ok=True)
    with open(os.path.join(snapshot, name), "w") as f:
      f.write(text)
  os.makedirs(os.path.join(storage, "refs"), exist_ok=True)
  with open(os.path.join(storage, "refs", "main"), "w") as f:
    f.write(COMMIT)
  os.makedirs(snapshot, exist_ok=True)
  return snapshot


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
  """An empty huggingface_hub cache in tmp_path, offline (HF_HUB_OFFLINE=1)."""
  pytest.importorskip("huggingface_hub", reason="resolving Hub ids needs huggingface_hub")
  from huggingface_hub import constants  # pylint: disable=import-outside-toplevel

  cache = str(tmp_path / "hf_cache")
  os.makedirs(cache)
  monkeypatch.setattr(constants, "HF_HUB_CACHE", cache)
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  return cache


def test_what_is_a_hub_id(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert hub.model_repo_id(MODEL_ID) == MODEL_ID
  assert hub.model_repo_id("hf:" + MODEL_ID) == MODEL_ID
  os.makedirs("models/smol")
  for local in ("models/smol", "/models/SmolLM2-360M-Instruct", "./a/b", "../a", "~/a/b", "a/b/c", "model", ""):
    assert hub.model_repo_id(local) is None, local
  assert hub.data_repo_id("hf:openai/gsm8k") == ("openai/gsm8k", "")
  assert hub.data_repo_id("hf:openai/gsm8k/main") == ("openai/gsm8k", "main")
  for local in ("/data/gsm8k", "openai/gsm8k", "tfds:my_gsm8k:test", "train.jsonl", ""):
    assert hub.data_repo_id(local) is None, local
  for bad, resolve in (("hf:gsm8k", hub.resolve_data), ("hf:openai/gsm8k/../x", hub.resolve_data),
                       ("hf:just-a-name", hub.resolve_model), ("hf:a/b/c", hub.resolve_model)):
    with pytest.raises(hub.HubError, match="is not a Hugging Face Hub"):
      resolve(bad)


def test_local_paths_are_returned_unchanged_without_huggingface_hub(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # importing it would fail
  (tmp_path / "train.jsonl").write_text("{}\n")
  for path in (str(tmp_path), str(tmp_path / "train.jsonl"), "/models/missing", "tfds:gsm8k:train", ""):
    assert hub.resolve_model(path) == path and hub.resolve_data(path) == path


def test_a_hub_id_without_huggingface_hub_says_what_to_install(monkeypatch):
  monkeypatch.setitem(sys.modules, "huggingface_hub", None)
  with pytest.raises(hub.HubError, match=r"needs huggingface_hub: pip install huggingface_hub"):
    hub.resolve_model(MODEL_ID)
  with pytest.raises(ValueError, match="openai/gsm8k"):  # a ValueError: main prints it as one error line
    hub.resolve_data("hf:openai/gsm8k/main")


def test_model_and_data_are_read_from_the_cache_offline(hf_cache):
  model = cache_repo(hf_cache, "model", MODEL_ID, {"config.json": "{}", "model.safetensors": ""})
  gsm8k = cache_repo(hf_cache, "dataset", "openai/gsm8k", {"main/train-00000-of-00001.parquet": "",
                                                           "socratic/train-00000-of-00001.parquet": ""})
  single = cache_repo(hf_cache, "dataset", "owner/one", {"data/train-00000-of-00001.parquet": ""})
  assert hub.resolve_model(MODEL_ID) == model
  assert hub.resolve_model("hf:" + MODEL_ID) == model
  assert hub.resolve_data("hf:openai/gsm8k/main") == os.path.join(gsm8k, "main")
  assert hub.resolve_data("hf:owner/one") == single  # one subset directory: the reader finds data/train-*
  with pytest.raises(hub.HubError, match=r"several subsets \(main, socratic\); name one, e\.g\. "
                                         r"hf:openai/gsm8k/main"):
    hub.resolve_data("hf:openai/gsm8k")
  with pytest.raises(hub.HubError, match=r"no subset directory 'mian'.*its subsets: main, socratic"):
    hub.resolve_data("hf:openai/gsm8k/mian")


def test_online_with_the_hub_unreachable_falls_back_to_the_cache(hf_cache, monkeypatch):
  from huggingface_hub import constants  # pylint: disable=import-outside-toplevel

  monkeypatch.setenv("HF_HUB_OFFLINE", "0")
  monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
  monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
  model = cache_repo(hf_cache, "model", MODEL_ID, {"config.json": "{}"})
  assert hub.resolve_model(MODEL_ID) == model
  with pytest.raises(hub.HubError) as error:
    hub.resolve_data("hf:openai/gsm8k/main")
  message = str(error.value)
  assert "'openai/gsm8k' is not in the Hugging Face cache " + hf_cache in message
  assert "downloading it failed (" in message
  assert f"hf download openai/gsm8k --repo-type dataset --include 'main/*' --cache-dir {hf_cache}" in message


def test_neither_cached_nor_downloadable_names_the_id_the_cache_and_the_command(hf_cache):
  with pytest.raises(hub.HubError) as error:
    hub.resolve_model(MODEL_ID)
  message = str(error.value)
  assert isinstance(error.value, FileNotFoundError) and isinstance(error.value, ValueError)
  assert f"The model {MODEL_ID!r} is not in the Hugging Face cache {hf_cache}" in message
  assert "HF_HUB_OFFLINE=1, so nothing is downloaded" in message
  assert (f"hf download {MODEL_ID} --include '*.json' --include '*.safetensors' --include '*.jinja' "
          f"--exclude '*/*' --cache-dir {hf_cache}") in message
  assert "huggingface-cli download" in message and "set config.model.path to a local checkpoint" in message
  assert f"no local file or directory {MODEL_ID!r} exists either" in message
  with pytest.raises(hub.HubError, match=r"The dataset 'openai/gsm8k' is not in the Hugging Face cache .* "
                                         r"hf download openai/gsm8k --repo-type dataset --include '\*\.parquet'"):
    hub.resolve_data("hf:openai/gsm8k")


def test_the_text_task_reads_a_model_and_gsm8k_through_hub_ids(hf_cache, tmp_path):
  """configs/gsm8k_smollm2.py:tiny with model.path and data paths as Hub ids: prepare() loads from the cache."""
  pytest.importorskip("tokenizers")
  from configs import gsm8k_smollm2  # pylint: disable=import-outside-toplevel
  from maxrl_jax.tasks import base  # pylint: disable=import-outside-toplevel
  from maxrl_jax.text import data as data_lib  # pylint: disable=import-outside-toplevel
  from maxrl_jax.text import synthetic  # pylint: disable=import-outside-toplevel

  model = cache_repo(hf_cache, "model", MODEL_ID, {})
  synthetic.write_tiny_checkpoint(model, architecture="llama", num_layers=1, hidden_size=32, ffn_size=64)
  gsm8k = cache_repo(hf_cache, "dataset", "openai/gsm8k", {})
  rows = lambda n, seed: data_lib.problems_to_rows(data_lib.synthetic_arithmetic(n, seed=seed))
  for subset, train_size in (("main", 12), ("socratic", 5)):
    data_lib.write_jsonl(os.path.join(gsm8k, subset, "train.jsonl"), rows(train_size, 0))
    data_lib.write_jsonl(os.path.join(gsm8k, subset, "test.jsonl"), rows(3, 1))
  config = gsm8k_smollm2.get_config("tiny")
  config.model.synthetic, config.data.synthetic, config.sft.steps = "", False, 0
  config.model.path, config.data.train_path = MODEL_ID, "hf:openai/gsm8k/main"
  task = base.make_task(config)
  task.validate()
  task.prepare(str(tmp_path / "workdir"))
  try:
    assert task.model_path == model
    assert len(task.train_problems) == 12 and len(task.eval_problems) == 3  # main's, not socratic's
    assert task.model_config().num_layers == 1
  finally:
    task.close()
