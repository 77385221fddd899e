"""Tokenizer (tokenizer.json through the `tokenizers` package), chat templates and stop tokens.

    tokenizer = TextTokenizer.from_pretrained("/models/SmolLM2-360M-Instruct")
    template = ChatTemplate.from_pretrained("/models/SmolLM2-360M-Instruct", name="auto")
    text = template.render([{"role": "user", "content": question}], add_generation_prompt=True)
    ids = tokenizer.encode(text, add_special_tokens=template.add_special_tokens)

Chat templates:
  "auto":    the model's own jinja template (tokenizer_config.json "chat_template", or chat_template.jinja),
             rendered with jinja2 the way transformers renders it (sandboxed, trim_blocks, lstrip_blocks,
             loop controls, `tojson`, `raise_exception`, `strftime_now`, bos/eos tokens as variables).
             This is what reproduces the paper's prompts. With no template in the directory it is "none".
  "chatml":  <|im_start|>{role}\\n{content}<|im_end|>\\n per message, then <|im_start|>assistant\\n.
  "smollm2": chatml with SmolLM2-Instruct's default system message when none is given.
  "qwen2.5": chatml with Qwen2.5-Instruct's default system message when none is given.
  "qwen3":   chatml without a default system message; `enable_thinking=False` appends an empty
             <think>\\n\\n</think>\\n\\n block after the generation prompt, as Qwen3's template does.
  "none":    the user content alone (base models), encoded with the tokenizer's special tokens (e.g. BOS).
The built-in ones are for when jinja2 is not installed; they follow the published templates' output for a
system / user conversation, but only "auto" is the model's own template.

Stop tokens are the union of the eos ids in config.json, generation_config.json and tokenizer_config.json,
plus the template's end-of-turn token (<|im_end|>) when it is a single token of the vocabulary.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

Message = Mapping[str, str]

DEFAULT_SYSTEM_PROMPTS = {
    "smollm2": "You are a helpful AI assistant named SmolLM, trained by Hugging Face",
    "qwen2.5": "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
}
BUILTIN_TEMPLATES = ("chatml", "smollm2", "qwen2.5", "qwen3", "none")
TEMPLATE_NAMES = ("auto", "jinja") + BUILTIN_TEMPLATES
_END_OF_TURN = {"chatml": "<|im_end|>", "smollm2": "<|im_end|>", "qwen2.5": "<|im_end|>",
                "qwen3": "<|im_end|>"}


_RESTORE = "restore it from the original checkpoint (copy or download it again)"


def _read_json(path: str) -> dict:
    """The JSON object in `path`, {} when the file is absent; ValueError naming the file when it is not JSON."""
    if not os.path.exists(path):
        return {}
    try:
        with open(path, "rb") as f:
            value = json.loads(f.read().decode("utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}): the file is "
                         f"damaged or was replaced by another one; {_RESTORE}.") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not valid JSON (not UTF-8 text); {_RESTORE}.") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} holds a JSON {type(value).__name__}, not an object; {_RESTORE}.")
    return value


def _token_content(token: Any) -> str | None:
    """tokenizer_config.json stores special tokens as strings or AddedToken dicts {"content": ...}."""
    if isinstance(token, Mapping):
        return token.get("content")
    return token


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    return [int(value)]


# ----------------------------------------------------------------------------------------------------------
# Tokenizer.
# ----------------------------------------------------------------------------------------------------------


class TextTokenizer:
    """A `tokenizers.Tokenizer` with the special tokens of a HF model directory.

    Attributes:
      eos_token_ids: stop tokens for the sampler (see the module docstring), sorted, at least one.
      pad_id: id used for left padding and after a rollout stops (pad token, else the first eos id).
      bos_token, eos_token: strings (for jinja templates), possibly None / "".
    """

    def __init__(
        self,
        tokenizer_json: str,
        *,
        tokenizer_config: Mapping[str, Any] | None = None,
        generation_config: Mapping[str, Any] | None = None,
        model_config: Mapping[str, Any] | None = None,
        extra_stop_tokens: Sequence[str] = (),
    ):
        try:
            import tokenizers  # pylint: disable=import-outside-toplevel
        except ImportError as e:
            raise ImportError("The text pipeline needs the `tokenizers` package: pip install tokenizers") from e
        if not os.path.exists(tokenizer_json):
            raise FileNotFoundError(
                f"{tokenizer_json} is missing: only fast tokenizers (tokenizer.json) are supported. Save one "
                "with transformers: AutoTokenizer.from_pretrained(path).save_pretrained(path)."
            )
        try:
            self._tokenizer = tokenizers.Tokenizer.from_file(tokenizer_json)
        except Exception as e:  # pylint: disable=broad-except  # the Rust parser's errors carry no file name
            raise ValueError(
                f"{tokenizer_json} cannot be read as a fast tokenizer ({e}): the file is damaged, not JSON, or "
                f"written by a newer `tokenizers` than the installed {tokenizers.__version__}; {_RESTORE}, or "
                "re-save it with transformers: AutoTokenizer.from_pretrained(path).save_pretrained(path)."
            ) from None
        tokenizer_config = dict(tokenizer_config or {})
        self.tokenizer_config = tokenizer_config
        self.bos_token = _token_content(tokenizer_config.get("bos_token"))
        self.eos_token = _token_content(tokenizer_config.get("eos_token"))
        pad_token = _token_content(tokenizer_config.get("pad_token"))

        eos_ids = set(_as_id_list((model_config or {}).get("eos_token_id")))
        eos_ids |= set(_as_id_list((generation_config or {}).get("eos_token_id")))
        for token in [self.eos_token, *extra_stop_tokens]:
            if token:
                token_id = self._tokenizer.token_to_id(token)
                if token_id is None:
                    raise ValueError(f"Stop token {token!r} is not in the vocabulary.")
                eos_ids.add(token_id)
        if not eos_ids:
            raise ValueError("No eos token found in config.json, generation_config.json or "
                             "tokenizer_config.json; pass extra_stop_tokens.")
        self.eos_token_ids = tuple(sorted(eos_ids))
        pad_id = self._tokenizer.token_to_id(pad_token) if pad_token else None
        self.pad_id = int(pad_id) if pad_id is not None else self.eos_token_ids[0]

    @classmethod
    def from_pretrained(cls, path: str, extra_stop_tokens: Sequence[str] = ()) -> "TextTokenizer":
        """From a local model directory (tokenizer.json, tokenizer_config.json, generation_config.json,
        config.json)."""
        return cls(
            os.path.join(path, "tokenizer.json"),
            tokenizer_config=_read_json(os.path.join(path, "tokenizer_config.json")),
            generation_config=_read_json(os.path.join(path, "generation_config.json")),
            model_config=_read_json(os.path.join(path, "config.json")),
            extra_stop_tokens=extra_stop_tokens,
        )

    @property
    def vocab_size(self) -> int:
        """Number of token ids the tokenizer can produce (added tokens included)."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tokenizer.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = False) -> list[list[int]]:
        return [e.ids for e in self._tokenizer.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def decode_batch(self, ids: Sequence[Sequence[int]], skip_special_tokens: bool = True) -> list[str]:
        """Decodes many sequences (in parallel, in the Rust library)."""
        return self._tokenizer.decode_batch(
            [[int(i) for i in row] for row in ids], skip_special_tokens=skip_special_tokens
        )


# ----------------------------------------------------------------------------------------------------------
# Chat templates.
# ----------------------------------------------------------------------------------------------------------


def _render_chatml(messages: Sequence[Message], add_generation_prompt: bool, default_system: str | None,
                   enable_thinking: bool | None) -> str:
    parts = []
    if default_system and (not messages or messages[0]["role"] != "system"):
        parts.append(f"<|im_start|>system\n{default_system}<|im_end|>\n")
    for message in messages:
        parts.append(f"<|im_start|>{message['role']}\n{message['content']}<|im_end|>\n")
    if add_generation_prompt:
        parts.append("<|im_start|>assistant\n")
        if enable_thinking is False:
            parts.append("<think>\n\n</think>\n\n")
    return "".join(parts)


def _jinja_environment():
    try:
        import jinja2  # pylint: disable=import-outside-toplevel
        import jinja2.ext  # pylint: disable=import-outside-toplevel
        import jinja2.sandbox  # pylint: disable=import-outside-toplevel
    except ImportError as e:
        raise ImportError(
            "The model's chat template is jinja: pip install jinja2, or set the chat template to a "
            f"built-in one ({', '.join(BUILTIN_TEMPLATES)})."
        ) from e

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """A chat template: a built-in name, or jinja source.

    Attributes:
      name: one of BUILTIN_TEMPLATES, or "jinja".
      source: the jinja source (name == "jinja").
      bos_token, eos_token: passed to jinja templates.
      end_of_turn: the token that ends an assistant turn (a stop token), or None.
    """

    name: str
    source: str = ""
    bos_token: str | None = None
    eos_token: str | None = None
    end_of_turn: str | None = None

    @classmethod
    def from_pretrained(cls, path: str, name: str = "auto") -> "ChatTemplate":
        """The template `name` for the model directory `path` (see the module docstring)."""
        if name not in TEMPLATE_NAMES:
            raise ValueError(f"chat template {name!r}; allowed: {list(TEMPLATE_NAMES)}.")
        config = _read_json(os.path.join(path, "tokenizer_config.json"))
        bos, eos = _token_content(config.get("bos_token")), _token_content(config.get("eos_token"))
        if name in BUILTIN_TEMPLATES:
            return cls(name=name, bos_token=bos, eos_token=eos, end_of_turn=_END_OF_TURN.get(name))
        source = config.get("chat_template")
        if isinstance(source, list):  # [{"name": "default", "template": ...}, ...]
            named = {entry.get("name"): entry.get("template") for entry in source}
            source = named.get("default") or next(iter(named.values()), None)
        jinja_path = os.path.join(path, "chat_template.jinja")
        if not source and os.path.exists(jinja_path):
            with open(jinja_path) as f:
                source = f.read()
        if not source:
            if name == "jinja":
                raise ValueError(f"No chat template in {path} (tokenizer_config.json or chat_template.jinja).")
            return cls(name="none", bos_token=bos, eos_token=eos)
        _jinja_environment()  # fail early when jinja2 is missing
        end_of_turn = "<|im_end|>" if "<|im_end|>" in source else None
        return cls(name="jinja", source=source, bos_token=bos, eos_token=eos, end_of_turn=end_of_turn)

    @property
    def add_special_tokens(self) -> bool:
        """Whether to encode the rendered text with the tokenizer's special tokens (only without a template;
        templates write their own BOS)."""
        return self.name == "none"

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True, **kwargs) -> str:
        """The conversation as text, ending with the assistant generation prompt.

        kwargs go to jinja templates (e.g. enable_thinking=False for Qwen3); the built-in "qwen3" reads
        enable_thinking too.
        """
        if self.name == "none":
            return "\n\n".join(m["content"] for m in messages)
        if self.name == "jinja":
            template = _jinja_environment().from_string(self.source)
            return template.render(
                messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "", eos_token=self.eos_token or "", **kwargs
            )
        return _render_chatml(
            messages, add_generation_prompt, DEFAULT_SYSTEM_PROMPTS.get(self.name),
            kwargs.get("enable_thinking") if self.name == "qwen3" else None,
        )


def stop_token_ids(tokenizer: TextTokenizer, template: ChatTemplate) -> tuple[int, ...]:
    """Sampler stop tokens: the tokenizer's eos ids plus the template's end-of-turn token when it is one
    token of the vocabulary."""
    ids = set(tokenizer.eos_token_ids)
    if template.end_of_turn:
        token_id = tokenizer.token_to_id(template.end_of_turn)
        if token_id is not None:
            ids.add(token_id)
    return tuple(sorted(ids))
