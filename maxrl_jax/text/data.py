r"""Math problems from local files (JSONL, JSON, parquet) or a prepared TFDS dataset; prompts; synthetic data.

    problems = load_problems("/data/gsm8k/train.jsonl")                  # GSM8K: question / answer "... #### 72"
    problems = load_problems("/data/MATH-500/test.jsonl")                # MATH: problem / answer (or solution)
    problems = load_problems("/data/gsm8k", split="test")                # a directory: test.jsonl, test-*.parquet,
                                                                         #   main/test-*.parquet (HF layout)
    problems = load_problems("tfds:my_gsm8k:test", data_dir="/tfds")     # a TFDS dataset you prepared
    prompts = encode_prompts(problems, tokenizer, template, suffix=PAPER_PROMPT_SUFFIX)

Nothing is downloaded: a missing file raises FileNotFoundError saying what was looked for.

Fields. The question is the first present of `question`, `problem`, `prompt`, `query`, `input` (or
`question_key`); the reference is the first of `answer`, `final_answer`, `ground_truth`, `gt_answer`,
`target`, `solution` (or `answer_key`). `answer_format`:
  gsm8k: the text after "####", commas removed (the paper's rule); the text before it, without the
    <<calculator>> annotations, becomes `Problem.solution` with "The final answer is \boxed{A}." appended.
  boxed: the last \boxed{...} of the field (MATH "solution"); the field is the solution.
  plain: the field as is.
  auto (default): gsm8k if the field contains "####", boxed if it contains \boxed, else plain.

The paper's GSM8K prompt is the question followed by PAPER_PROMPT_SUFFIX, through the chat template.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import random
import re
from collections.abc import Mapping, Sequence
from typing import Any

from maxrl_jax.text import math_verifier

PAPER_PROMPT_SUFFIX = " Let's think step by step and output the final answer within \\boxed{}."
QUESTION_KEYS = ("question", "problem", "prompt", "query", "input")
ANSWER_KEYS = ("answer", "final_answer", "ground_truth", "gt_answer", "target", "solution")
ANSWER_FORMATS = ("auto", "gsm8k", "boxed", "plain")


@dataclasses.dataclass(frozen=True)
class Problem:
    """One verifiable problem.

    Attributes:
      question: the problem text (without the prompt suffix or chat template).
      answer: the reference final answer, compared with `math_verifier.is_equivalent`.
      solution: a worked solution ending in \\boxed{answer} when the data has one ("" otherwise); used only
        by the optional SFT warm-up.
      uid: a stable id (the row index in its file unless the data has an "id"/"uid"/"unique_id").
    """

    question: str
    answer: str
    solution: str = ""
    uid: str = ""


# ----------------------------------------------------------------------------------------------------------
# Answers.
# ----------------------------------------------------------------------------------------------------------


def gsm8k_answer(text: str) -> str:
    """GSM8K's final answer: the text after the last '####', commas removed, stripped."""
    if "####" not in text:
        raise ValueError(f"GSM8K answer without '####': {text[-80:]!r}")
    return text.rsplit("####", 1)[1].strip().replace(",", "")


def gsm8k_solution(text: str) -> str:
    r"""GSM8K's worked solution with <<a*b=c>> annotations removed and a \boxed final answer."""
    rationale = re.sub(r"<<[^<>]*>>", "", text.rsplit("####", 1)[0]).strip()
    return f"{rationale}\nThe final answer is \\boxed{{{gsm8k_answer(text)}}}."


def _reference(value: str, answer_format: str) -> tuple[str, str]:
    """(answer, solution) of a reference field under `answer_format`."""
    if answer_format == "auto":
        answer_format = "gsm8k" if "####" in value else ("boxed" if "\\boxed" in value else "plain")
    if answer_format == "gsm8k":
        return gsm8k_answer(value), gsm8k_solution(value)
    if answer_format == "boxed":
        boxed = math_verifier.last_boxed(value)
        if boxed is None:
            raise ValueError(f"No \\boxed{{...}} in the reference {value[-80:]!r}.")
        return boxed.strip(), value
    if answer_format == "plain":
        return value.strip(), ""
    raise ValueError(f"answer_format {answer_format!r}; allowed: {list(ANSWER_FORMATS)}.")


# ----------------------------------------------------------------------------------------------------------
# Files.
# ----------------------------------------------------------------------------------------------------------


def _read_rows(path: str) -> list[dict]:
    if path.endswith(".jsonl"):
        rows = []
        with open(path) as f:
            for line_number, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}:{line_number} is not valid JSON: {e}") from e
        return rows
    if path.endswith(".json"):
        with open(path) as f:
            data = json.load(f)
        if isinstance(data, Mapping):  # {"data": [...]} or {"rows": [...]}
            lists = [v for v in data.values() if isinstance(v, list)]
            if len(lists) != 1:
                raise ValueError(f"{path}: expected a list of rows or an object holding one list.")
            data = lists[0]
        return list(data)
    if path.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
        except ImportError as e:
            raise ImportError(f"Reading {path} needs pyarrow: pip install pyarrow (or convert to JSONL).") from e
        return pq.read_table(path).to_pylist()
    raise ValueError(f"{path}: unsupported file type; use .jsonl, .json or .parquet.")


def _split_files(directory: str, split: str) -> list[str]:
    patterns = [f"{split}.jsonl", f"{split}.json", f"{split}.parquet", f"{split}-*.parquet",
                f"*/{split}.jsonl", f"*/{split}-*.parquet", f"data/{split}-*.parquet"]
    for pattern in patterns:
        files = sorted(glob.glob(os.path.join(directory, pattern)))
        if files:
            return files
    raise FileNotFoundError(
        f"No {split!r} split in {directory}: looked for {', '.join(patterns)}. Nothing is downloaded; "
        "put GSM8K / MATH-style files there (e.g. the parquet files of the Hugging Face dataset repository)."
    )


def _read_tfds(spec: str, data_dir: str | None) -> list[dict]:
    """Rows of a prepared TFDS dataset: 'tfds:NAME[/CONFIG][:SPLIT]' or 'tfds:/path/to/version_dir:SPLIT'."""
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

    body = spec[len("tfds:"):]
    name, _, split = body.rpartition(":") if ":" in body else (body, "", "train")
    if os.path.isabs(name):
        builder = tfds.builder_from_directory(name)
    else:
        try:
            builder = tfds.builder(name, data_dir=data_dir)
        except tfds.core.registered.DatasetNotFoundError:
            builder = None
        if builder is None or not builder.is_prepared():
            raise FileNotFoundError(
                f"TFDS dataset {name!r} is not prepared in {data_dir or 'the default TFDS data_dir'}. Nothing "
                "is downloaded here: prepare it where you have the files (download_and_prepare with "
                "file_format='array_record'), or pass JSONL / parquet files instead."
            )
    try:
        source = builder.as_data_source(split=split)
    except Exception as e:  # pylint: disable=broad-except  # TFDS raises several types
        raise ValueError(
            f"Could not open split {split!r} of {name!r} as a random-access source ({e}). Without "
            "TensorFlow only ArrayRecord datasets can be read: prepare it with file_format='array_record'."
        ) from e

    def decode(value):
        return value.decode("utf-8") if isinstance(value, bytes) else value

    return [{k: decode(v) for k, v in source[i].items()} for i in range(len(source))]


def read_rows(source: str, split: str = "train", data_dir: str | None = None) -> list[dict]:
    """Raw rows of a file, a directory (its `split` files) or a 'tfds:' spec."""
    if source.startswith("tfds:"):
        return _read_tfds(source if source.count(":") >= 2 else f"{source}:{split}", data_dir)
    if os.path.isdir(source):
        return [row for path in _split_files(source, split) for row in _read_rows(path)]
    if not os.path.exists(source):
        raise FileNotFoundError(f"Data file {source!r} does not exist (nothing is downloaded).")
    return _read_rows(source)


def _first_key(row: Mapping[str, Any], explicit: str | None, candidates: Sequence[str], what: str,
               source: str) -> str:
    if explicit:
        if explicit not in row:
            raise KeyError(f"{source}: rows have no {what} field {explicit!r}; fields: {sorted(row)}.")
        return explicit
    for key in candidates:
        if key in row:
            return key
    raise KeyError(f"{source}: no {what} field among {list(candidates)}; fields: {sorted(row)}. "
                   f"Set the {what} key explicitly.")


def load_problems(
    source: str,
    *,
    split: str = "train",
    question_key: str | None = None,
    answer_key: str | None = None,
    answer_format: str = "auto",
    data_dir: str | None = None,
    limit: int | None = None,
    exclude: Mapping[str, Sequence[Any]] | None = None,
) -> list[Problem]:
    """Problems of a GSM8K / MATH-style source (see the module docstring).

    Args:
      source: a .jsonl / .json / .parquet file, a directory holding `split` files, or "tfds:NAME[:SPLIT]".
      split: the split to read from a directory or TFDS dataset.
      question_key, answer_key: field names (default: detected).
      answer_format: auto | gsm8k | boxed | plain.
      data_dir: TFDS data_dir.
      limit: keep the first `limit` problems (None or 0: all).
      exclude: drop rows whose field has one of the listed values, e.g. {"cleaning_status": ["rejected"]}.
    """
    if answer_format not in ANSWER_FORMATS:
        raise ValueError(f"answer_format {answer_format!r}; allowed: {list(ANSWER_FORMATS)}.")
    rows = read_rows(source, split, data_dir)
    if not rows:
        raise ValueError(f"{source} ({split}) holds no rows.")
    q_key = _first_key(rows[0], question_key, QUESTION_KEYS, "question", source)
    a_key = _first_key(rows[0], answer_key, ANSWER_KEYS, "answer", source)
    problems = []
    for index, row in enumerate(rows):
        if exclude and any(row.get(field) in values for field, values in exclude.items()):
            continue
        answer, solution = _reference(str(row[a_key]), answer_format)
        if not solution and a_key != "solution" and row.get("solution"):
            solution = str(row["solution"])
        uid = str(row.get("uid", row.get("id", row.get("unique_id", index))))
        problems.append(Problem(question=str(row[q_key]).strip(), answer=answer, solution=solution, uid=uid))
        if limit and len(problems) >= limit:
            break
    return problems


def write_jsonl(path: str, rows: Sequence[Mapping[str, Any]]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(dict(row)) + "\n")


# ----------------------------------------------------------------------------------------------------------
# Prompts.
# ----------------------------------------------------------------------------------------------------------


def prompt_text(question: str, template, suffix: str = PAPER_PROMPT_SUFFIX, system_prompt: str = "",
                **template_kwargs) -> str:
    """The chat-templated prompt: [system,] user(question + suffix), then the assistant generation prompt."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": question + suffix})
    return template.render(messages, add_generation_prompt=True, **template_kwargs)


def encode_prompts(problems: Sequence[Problem], tokenizer, template, *, suffix: str = PAPER_PROMPT_SUFFIX,
                   system_prompt: str = "", max_tokens: int | None = None,
                   **template_kwargs) -> tuple[list[list[int]], list[int]]:
    """Token ids of every problem's prompt, dropping prompts longer than `max_tokens`.

    Returns:
      (token lists of the kept problems, indices of the kept problems in `problems`).
    """
    texts = [prompt_text(p.question, template, suffix, system_prompt, **template_kwargs) for p in problems]
    encoded = tokenizer.encode_batch(texts, add_special_tokens=template.add_special_tokens)
    kept = [i for i, ids in enumerate(encoded) if ids and (not max_tokens or len(ids) <= max_tokens)]
    return [encoded[i] for i in kept], kept


# ----------------------------------------------------------------------------------------------------------
# Synthetic arithmetic (tiny presets and tests).
# ----------------------------------------------------------------------------------------------------------


def synthetic_arithmetic(num_problems: int, seed: int, max_operand: int = 4) -> list[Problem]:
    r"""Problems "What is a + b?" with 0 <= a, b <= max_operand, answer a + b, solution "\boxed{a+b}".

    Deterministic in (num_problems, seed, max_operand).
    """
    rng = random.Random(seed)
    problems = []
    for index in range(num_problems):
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        problems.append(Problem(question=f"What is {a} + {b}?", answer=str(a + b),
                                solution=f"\\boxed{{{a + b}}}", uid=f"{seed}-{index}"))
    return problems


def problems_to_rows(problems: Sequence[Problem]) -> list[dict]:
    """Rows in the MATH-style layout (problem / answer / solution) that `load_problems` reads back."""
    return [{"problem": p.question, "answer": p.answer, "solution": p.solution, "unique_id": p.uid}
            for p in problems]
