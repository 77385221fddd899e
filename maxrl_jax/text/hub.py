"""Hugging Face Hub ids for models and data, resolved to directories of huggingface_hub's cache.

    resolve_model("HuggingFaceTB/SmolLM2-360M-Instruct")  # <cache>/models--HuggingFaceTB--SmolLM2-360M-Instruct/
                                                          #   snapshots/<commit>
    resolve_model("/models/SmolLM2-360M-Instruct")        # a local path: returned unchanged
    resolve_data("hf:openai/gsm8k/main")                  # <cache>/datasets--openai--gsm8k/snapshots/<commit>/main
    resolve_data("/data/gsm8k/train.jsonl")               # a file, a directory or tfds:...: returned unchanged

What is a Hub id:
  model   `owner/name` when no file or directory of that name exists (relative to the working directory), or
          `hf:owner/name` (always the Hub). Any other value is a local path and is returned unchanged.
  data    `hf:owner/name` or `hf:owner/name/subset`, a dataset repository, or one subset (a top-level
          directory, e.g. GSM8K's `main`) of it. Anything else is returned unchanged.

The result is a directory that the local readers take as they would a copy made by hand: the checkpoint
directory (config.json, safetensors, tokenizer files) for a model, the directory holding the split files
(`train-*.parquet`, `test.jsonl`, ...) for data.

Downloads go through `huggingface_hub.snapshot_download`, with its progress bars, into its cache (HF_HUB_CACHE,
or HF_HOME/hub; by default ~/.cache/huggingface/hub), and fetch only what the readers use: a model's top-level
*.json, *.safetensors and *.jinja files (not ONNX or GGUF copies), a dataset's *.parquet / *.jsonl / *.json
files (those of the subset only, when one is named). Later runs find them in the cache; when the Hub cannot
be reached, the cached snapshot is used. With HF_HUB_OFFLINE=1 nothing is asked: the cache is read
(local_files_only). When the repository is neither in the cache nor downloadable, `HubError` names the id, the
cache directory and the `hf download` command that fetches exactly these files.

huggingface_hub is imported only when a Hub id is resolved (`pip install huggingface_hub`, or the `text`
extra); local paths never need it.
"""

from __future__ import annotations

import errno
import os
import re
import shlex

HF_PREFIX = "hf:"
# Files of a model repository that the checkpoint and tokenizer loaders read (top level only).
MODEL_PATTERNS = ("*.json", "*.safetensors", "*.jinja")
MODEL_IGNORE = ("*/*",)
# Files the data reader takes.
DATA_PATTERNS = ("*.parquet", "*.jsonl", "*.json")

_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9_])?"
_REPO_ID = re.compile(rf"({_NAME})/({_NAME})")
_DATA_ID = re.compile(rf"({_NAME})/({_NAME})(?:/([^/\\]+(?:/[^/\\]+)*))?")


class HubError(ValueError, FileNotFoundError):
    """A Hub id that could not be resolved: the message names it, the cache and the command to fetch it."""

    def __init__(self, message: str, repo_id: str | None = None):
        super().__init__(message)
        self.errno, self.filename = errno.ENOENT, repo_id

    __str__ = BaseException.__str__


def model_repo_id(path: str) -> str | None:
    """The Hub repository id that `path` (config.model.path) names, or None for a local path."""
    if not isinstance(path, str) or not path:
        return None
    if path.startswith(HF_PREFIX):
        repo_id = path[len(HF_PREFIX):]
        if not _REPO_ID.fullmatch(repo_id):
            raise HubError(f"{path!r} is not a Hugging Face Hub model id: write hf:OWNER/NAME, e.g. "
                           "hf:HuggingFaceTB/SmolLM2-360M-Instruct.", path)
        return repo_id
    if os.path.exists(path) or not _REPO_ID.fullmatch(path):
        return None
    return path


def data_repo_id(source: str) -> tuple[str, str] | None:
    """(repository id, subset or "") that `source` (config.data.*_path) names, or None for a local source."""
    if not isinstance(source, str) or not source.startswith(HF_PREFIX):
        return None
    match = _DATA_ID.fullmatch(source[len(HF_PREFIX):])
    if not match or ".." in (match.group(3) or "").split("/"):
        raise HubError(f"{source!r} is not a Hugging Face Hub dataset id: write hf:OWNER/NAME or "
                       "hf:OWNER/NAME/SUBSET, e.g. hf:openai/gsm8k/main.", source)
    return f"{match.group(1)}/{match.group(2)}", match.group(3) or ""


def _offline() -> bool:
    from huggingface_hub import constants  # pylint: disable=import-outside-toplevel

    value = os.environ.get("HF_HUB_OFFLINE")
    if value is None:
        return bool(constants.HF_HUB_OFFLINE)
    return value.strip().upper() in ("1", "ON", "YES", "TRUE")


def _hf_download_command(repo_id: str, repo_type: str, allow: tuple[str, ...], ignore: tuple[str, ...],
                         cache_dir: str) -> str:
    words = ["hf", "download", repo_id]
    if repo_type != "model":
        words += ["--repo-type", repo_type]
    for pattern in allow:
        words += ["--include", pattern]
    for pattern in ignore:
        words += ["--exclude", pattern]
    words += ["--cache-dir", cache_dir]
    return " ".join(shlex.quote(word) for word in words)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def _snapshot(repo_id: str, repo_type: str, allow: tuple[str, ...], ignore: tuple[str, ...], what: str,
              local_fix: str) -> str:
    """snapshot_download into the cache (cache only when offline), or a HubError saying how to fetch it."""
    try:
        import huggingface_hub  # pylint: disable=import-outside-toplevel
        from huggingface_hub import constants  # pylint: disable=import-outside-toplevel
    except ImportError as e:
        raise HubError(f"{what} {repo_id!r} is a Hugging Face Hub id, and resolving it needs huggingface_hub: "
                       "pip install huggingface_hub (or the text extra: pip install \"maxrl_jax[text]\"); "
                       f"or {local_fix}.", repo_id) from e
    cache_dir = str(constants.HF_HUB_CACHE)
    offline = _offline()
    try:
        return huggingface_hub.snapshot_download(
            repo_id, repo_type=repo_type, allow_patterns=list(allow), ignore_patterns=list(ignore) or None,
            local_files_only=offline)
    except Exception as e:  # pylint: disable=broad-except  # the Hub's errors are many; all end here
        command = _hf_download_command(repo_id, repo_type, allow, ignore, cache_dir)
        if offline:
            why = "HF_HUB_OFFLINE=1, so nothing is downloaded"
        else:
            why = f"downloading it failed ({_first_line(e)})"
        raise HubError(
            f"{what} {repo_id!r} is not in the Hugging Face cache {cache_dir} and {why}. Fetch it where the Hub "
            f"is reachable, into the same cache: {command} (huggingface_hub before 0.34: huggingface-cli download "
            f"with the same options); or {local_fix}.", repo_id) from e


def resolve_model(path: str) -> str:
    """config.model.path -> a local checkpoint directory (a Hub id's cached snapshot; local paths unchanged)."""
    repo_id = model_repo_id(path)
    if repo_id is None:
        return path
    fix = "set config.model.path to a local checkpoint directory"
    if not path.startswith(HF_PREFIX):
        fix += f" (no local file or directory {path!r} exists either)"
    return _snapshot(repo_id, "model", MODEL_PATTERNS, MODEL_IGNORE, "The model", fix)


def _data_directories(root: str) -> list[str]:
    """Top-level directories of `root` that hold data files."""
    found = []
    for name in sorted(os.listdir(root)):
        directory = os.path.join(root, name)
        if not name.startswith(".") and os.path.isdir(directory):
            for _, _, files in os.walk(directory):
                if any(f.endswith((".parquet", ".jsonl", ".json")) for f in files):
                    found.append(name)
                    break
    return found


def resolve_data(source: str) -> str:
    """config.data.*_path -> a local file or directory (a Hub dataset's cached snapshot; others unchanged).

    Without a subset, a snapshot whose data files sit in several top-level directories (one per subset, as
    GSM8K's main/ and socratic/) is refused with their names: reading them all would mix the subsets.
    """
    ids = data_repo_id(source)
    if ids is None:
        return source
    repo_id, subset = ids
    allow = (f"{subset}/*",) if subset else DATA_PATTERNS
    root = _snapshot(repo_id, "dataset", allow, (), "The dataset", "set the data path to local files")
    if subset:
        directory = os.path.join(root, subset)
        if not os.path.isdir(directory):
            held = ", ".join(_data_directories(root)) or "none"
            raise HubError(f"{source}: the dataset {repo_id!r} has no subset directory {subset!r} (in {root}); "
                           f"its subsets: {held}.", source)
        return directory
    has_top_level_files = any(f.endswith((".parquet", ".jsonl", ".json")) and os.path.isfile(os.path.join(root, f))
                              for f in os.listdir(root))
    subsets = _data_directories(root)
    if not has_top_level_files and len(subsets) > 1:
        raise HubError(f"{source}: the dataset {repo_id!r} has several subsets ({', '.join(subsets)}); name one, "
                       f"e.g. hf:{repo_id}/{subsets[0]}.", source)
    return root
