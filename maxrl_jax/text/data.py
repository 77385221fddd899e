r"""Math problems from local files (JSONL, JSON, parquet) or a prepared TFDS dataset; prompts; synthetic data.

    problems = load_problems("/data/gsm8k/train.jsonl")                  # GSM8K: question / answer "... #### 72"
    problems = load_problems("/data/MATH-500/test.jsonl")                # MATH: problem / answer (or solution)
    problems = load_problems("/data/gsm8k", split="test")                # a directory: test.jsonl, test-*.parquet,
                                                                         #   main/test-*.parquet (HF layout)
    problems = load_problems("tfds:my_gsm8k:test", data_dir="/tfds")     # a TFDS dataset you prepared
    prompts = encode_prompts(problems, tokenizer, template, suffix=PAPER_PROMPT_SUFFIX)

Nothing is downloaded: a missing file raises FileNotFoundError saying what was looked for.

A source is read and checked as a whole before any problem is returned: every record must be an object
holding the question and answer fields as non-empty strings (a number is accepted as an answer), with an
answer that parses under `answer_format`. A bad source raises `DataError` (a ValueError) whose one-line
message names the file and the first bad record (`file:LINE` for JSONL, counted from 1; `item I`, `row I` or
`example I` for JSON, parquet and TFDS, counted from 0), the number of bad records, and the fix. A missing
file is a `DataFileNotFoundError` (also a FileNotFoundError), a missing field a `DataFieldError` (also a
KeyError).

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
import errno
import glob
import json
import math
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
FILE_TYPES = (".jsonl", ".json", ".parquet")


class DataError(ValueError):
    """A data source that cannot be used: the message names the file, the first bad record and the fix."""


class DataFieldError(DataError, KeyError):
    """Records without the question or answer field (a KeyError too, for callers that catch one)."""

    __str__ = BaseException.__str__  # The message as written (KeyError's would quote it).


class DataFileNotFoundError(DataError, FileNotFoundError):
    """A data file, split or TFDS dataset that does not exist here (nothing is downloaded)."""

    def __init__(self, message: str, filename: str | None = None):
        super().__init__(message)
        self.errno, self.filename = errno.ENOENT, filename

    __str__ = BaseException.__str__


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


@dataclasses.dataclass(frozen=True)
class _Record:
    """One raw record and where it is: "file.jsonl:LINE", "file.json, item I", "file.parquet, row I"."""

    where: str
    value: Any


def _short(value: Any, width: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= width else text[:width - 3] + "..."


def _several(count: int, total: int, what: str = "record") -> str:
    return f"{count} of {total} {what}s {'is' if count == 1 else 'are'} bad" + (" (the first is shown)"
                                                                               if count > 1 else "")


def _read_jsonl(path: str) -> list[_Record]:
    records, errors = [], []
    with open(path, "rb") as f:
        for line_number, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                records.append(_Record(f"{path}:{line_number}", json.loads(raw.decode("utf-8"))))
            except UnicodeDecodeError as e:
                errors.append((line_number, f"is not UTF-8 text ({e.reason} at byte {e.start})"))
            except json.JSONDecodeError as e:
                errors.append((line_number, f"is not valid JSON ({e.msg}, column {e.colno})"))
    if errors:
        line_number, reason = errors[0]
        hint = ("save the file as UTF-8" if "UTF-8" in reason else
                "each line of a .jsonl file must be one JSON object: fix or remove the line")
        if line_number == 1 and len(errors) == len(records) + len(errors):
            with open(path, "rb") as f:
                if f.read(64).lstrip().startswith(b"["):
                    hint = "it looks like one JSON array: name it .json, or write one object per line"
        raise DataError(f"{path}:{line_number} {reason}. {_several(len(errors), len(records) + len(errors), 'line')}"
                        f"; {hint}.")
    return records


def _read_json(path: str) -> list[_Record]:
    with open(path, "rb") as f:
        raw = f.read()
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8.") from e
    except json.JSONDecodeError as e:
        hint = "fix the file"
        if e.msg == "Extra data":
            hint = "it holds several JSON values, one per line: name it .jsonl"
        raise DataError(f"{path}:{e.lineno} is not valid JSON ({e.msg}, column {e.colno}); {hint}.") from e
    if isinstance(data, Mapping):  # {"data": [...]} or {"rows": [...]}
        lists = [k for k, v in data.items() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{path}: a JSON object must hold exactly one list of records (it holds "
                            f"{len(lists)}: {lists[:5]}); write a list of records [{{...}}, ...] instead.")
        data = data[lists[0]]
        where = f"{path}, {lists[0]!r} item"
    elif isinstance(data, list):
        where = f"{path}, item"
    else:
        raise DataError(f"{path} holds a JSON {type(data).__name__}, not a list of records; write "
                        "[{\"question\": ..., \"answer\": ...}, ...] (or one object per line in a .jsonl file).")
    return [_Record(f"{where} {i} (0-based)", row) for i, row in enumerate(data)]


def _read_parquet(path: str) -> list[_Record]:
    try:
        import pyarrow  # pylint: disable=import-outside-toplevel
        import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
    except ImportError as e:
        raise DataError(f"Reading {path} needs pyarrow: pip install pyarrow (or the text extra), or convert "
                        "the file to JSONL.") from e
    try:
        rows = pq.read_table(path).to_pylist()
    except (pyarrow.ArrowException, OSError) as e:
        raise DataError(f"{path} is not a readable parquet file ({str(e).splitlines()[0]}); check that it "
                        "was downloaded completely, or convert it to JSONL.") from e
    return [_Record(f"{path}, row {i} (0-based)", row) for i, row in enumerate(rows)]


def _read_file(path: str) -> list[_Record]:
    if not path.endswith(FILE_TYPES):
        hint = ""
        if path.endswith((".gz", ".bz2", ".xz", ".zst", ".zip")):
            hint = " Decompress it first."
        elif path.endswith((".csv", ".tsv")):
            hint = " Convert it to JSONL (e.g. pandas: read_csv(...).to_json(path, orient='records', lines=True))."
        raise DataError(f"{path}: unsupported file type; use {', '.join(FILE_TYPES)}.{hint}")
    try:
        if path.endswith(".jsonl"):
            return _read_jsonl(path)
        if path.endswith(".json"):
            return _read_json(path)
        return _read_parquet(path)
    except DataError:
        raise
    except OSError as e:
        raise DataError(f"{path} cannot be read ({e.strerror or e}); check its permissions.") from e


def _read_rows(path: str) -> list[Any]:
    return [record.value for record in _read_file(path)]


def _split_files(directory: str, split: str) -> list[str]:
    patterns = [f"{split}.jsonl", f"{split}.json", f"{split}.parquet", f"{split}-*.parquet",
                f"*/{split}.jsonl", f"*/{split}-*.parquet", f"data/{split}-*.parquet"]
    for pattern in patterns:
        files = sorted(f for f in glob.glob(os.path.join(directory, pattern)) if not os.path.isdir(f))
        if files:
            return files
    try:
        present = sorted(os.listdir(directory))
    except OSError:
        present = []
    held = (f" It holds: {', '.join(present[:8])}{', ...' if len(present) > 8 else ''}." if present
            else " It is empty.")
    raise DataFileNotFoundError(
        f"No {split!r} split in {directory}: looked for {', '.join(patterns)}.{held} Nothing is downloaded; "
        "put GSM8K / MATH-style files there (e.g. the parquet files of the Hugging Face dataset repository), "
        "or choose the split (config.data.train_split / eval_split) or the file (config.data.eval_path).",
        directory)


def _tfds_failure(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _read_tfds(spec: str, data_dir: str | None) -> list[_Record]:
    """Records of a prepared TFDS dataset: 'tfds:NAME[/CONFIG][:SPLIT]' or 'tfds:/path/to/version_dir:SPLIT'."""
    try:
        import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    except ImportError as e:
        raise DataError(f"Reading {spec} needs tensorflow-datasets: pip install tensorflow-datasets "
                        "array_record (no TensorFlow needed), or pass JSONL / parquet files instead.") from e

    body = spec[len("tfds:"):]
    name, _, split = body.rpartition(":") if ":" in body else (body, "", "train")
    if not name:
        raise DataError(f"{spec!r} names no TFDS dataset; write tfds:NAME[/CONFIG][:VERSION]:SPLIT or "
                        "tfds:/path/to/NAME/VERSION:SPLIT.")
    if os.path.isabs(name):
        try:
            builder = tfds.builder_from_directory(name)
        except Exception as e:  # pylint: disable=broad-except  # DatasetInfoFileError (an OSError) and others
            raise DataFileNotFoundError(
                f"{name} is not a prepared TFDS dataset directory ({_tfds_failure(e)}); pass the version "
                "directory that holds dataset_info.json, e.g. tfds:/tfds/my_gsm8k/1.0.0:test.", name) from e
    else:
        try:
            builder = tfds.builder(name, data_dir=data_dir)
        except tfds.core.registered.DatasetNotFoundError:
            builder = None
        except Exception as e:  # pylint: disable=broad-except  # a malformed name, an unknown config, ...
            raise DataError(f"TFDS dataset {name!r} cannot be opened ({_tfds_failure(e)}); write "
                            "tfds:NAME[/CONFIG][:VERSION]:SPLIT with a dataset prepared in data_dir.") from e
        if builder is None or not builder.is_prepared():
            raise DataFileNotFoundError(
                f"TFDS dataset {name!r} is not prepared in {data_dir or 'the default TFDS data_dir'}. Nothing "
                "is downloaded here: prepare it where you have the files (download_and_prepare with "
                "file_format='array_record'), or pass JSONL / parquet files instead.", name)
    try:
        source = builder.as_data_source(split=split)
    except Exception as e:  # pylint: disable=broad-except  # TFDS raises several types
        raise DataError(
            f"Could not open split {split!r} of {name!r} as a random-access source ({_tfds_failure(e)}). "
            "Without TensorFlow only ArrayRecord datasets can be read: prepare it with "
            "file_format='array_record'; the splits it has: "
            f"{sorted(getattr(builder.info, 'splits', {}) or [])}.") from e

    def decode(value):
        if isinstance(value, bytes):
            try:
                return value.decode("utf-8")
            except UnicodeDecodeError:
                return value
        return value

    records = []
    for i in range(len(source)):
        example = source[i]
        value = {k: decode(v) for k, v in example.items()} if isinstance(example, Mapping) else example
        records.append(_Record(f"{spec}, example {i} (0-based)", value))
    return records


def _read_records(source: str, split: str, data_dir: str | None) -> list[_Record]:
    if not isinstance(source, str) or not source.strip():
        raise DataError(f"The data source is {source!r}: give a .jsonl / .json / .parquet file, a directory "
                        "holding split files, or tfds:NAME:SPLIT.")
    if source.startswith("tfds:"):
        return _read_tfds(source if source.count(":") >= 2 else f"{source}:{split}", data_dir)
    if os.path.isdir(source):
        return [record for path in _split_files(source, split) for record in _read_file(path)]
    if not os.path.exists(source):
        raise DataFileNotFoundError(f"Data file {source!r} does not exist (nothing is downloaded); check the "
                                    "path.", source)
    return _read_file(source)


def read_rows(source: str, split: str = "train", data_dir: str | None = None) -> list[Any]:
    """Raw rows of a file, a directory (its `split` files) or a 'tfds:' spec, unchecked (see load_problems)."""
    return [record.value for record in _read_records(source, split, data_dir)]


# ----------------------------------------------------------------------------------------------------------
# Checking records.
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Bad:
    where: str
    reason: str
    fix: str
    missing_field: bool = False


def _kind(value: Any) -> str:
    if isinstance(value, list):
        return "a JSON array"
    if isinstance(value, str):
        return "a string"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, float) and not math.isfinite(value):
        return "a non-finite number"
    if isinstance(value, (int, float)):
        return "a number"
    return f"a {type(value).__name__}"


def _first_key(row: Mapping[str, Any], explicit: str | None, candidates: Sequence[str], what: str,
               where: str) -> tuple[str | None, _Bad | None]:
    """(the field of `what`, None), or (None, why not) for the record that decides it."""
    option = f"{what}_key (config.data.{what}_key=FIELD)"
    if explicit:
        if explicit in row:
            return explicit, None
        return None, _Bad(where, f"no {what} field {explicit!r} (fields: {sorted(row)[:12]})",
                          f"set {option} to one of the record's fields", True)
    for key in candidates:
        if key in row:
            return key, None
    return None, _Bad(where, f"no {what} field among {list(candidates)} (fields: {sorted(row)[:12]})",
                      f"name the field with {option}", True)


def _check_record(record: _Record, q_key: str, a_key: str, answer_format: str,
                  detected: Mapping[str, str]) -> tuple[Any, _Bad | None]:
    """((question, answer, solution), None) for a good record, else (None, why)."""
    row = record.value
    for key, what in ((q_key, "question"), (a_key, "answer")):
        if key not in row:
            origin = f"; {key!r} was detected from the first record" if what in detected else ""
            return None, _Bad(record.where, f"no {what} field {key!r} (its fields: {sorted(row)[:12]}{origin})",
                              f"add the field, remove the record, or set {what}_key (config.data.{what}_key)",
                              True)
    question, answer = row[q_key], row[a_key]
    if isinstance(question, str) and not question.strip():
        return None, _Bad(record.where, f"the question field {q_key!r} is empty", "fix or remove the record")
    if not isinstance(question, str):
        return None, _Bad(record.where, f"the question field {q_key!r} is {_kind(question)} ({_short(question)}), "
                          "not a string", "fix or remove the record")
    if isinstance(answer, (int, float)) and not isinstance(answer, bool) and math.isfinite(answer):
        answer = str(answer)
    if isinstance(answer, str) and not answer.strip():
        return None, _Bad(record.where, f"the answer field {a_key!r} is empty", "fix or remove the record")
    if not isinstance(answer, str):
        return None, _Bad(record.where, f"the answer field {a_key!r} is {_kind(answer)} ({_short(answer)}), not "
                          "a string or a number", "fix or remove the record")
    try:
        reference, solution = _reference(answer, answer_format)
    except ValueError as e:
        fmt = answer_format if answer_format != "auto" else "auto-detected"
        return None, _Bad(record.where, f"the answer field {a_key!r} does not parse as {fmt} ({e})",
                          "fix the record, or choose the answer_format (config.data.answer_format: gsm8k, "
                          "boxed, plain)")
    if not reference:
        return None, _Bad(record.where, f"the answer field {a_key!r} gives an empty final answer "
                          f"({_short(answer)})", "fix or remove the record")
    return (question, reference, solution), None


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
      limit: keep the first `limit` problems (None or 0: all); every record is checked all the same.
      exclude: drop rows whose field has one of the listed values, e.g. {"cleaning_status": ["rejected"]}
        (dropped rows are not checked beyond being objects).

    Returns:
      The problems, in the order of the source.

    Raises:
      DataFileNotFoundError: the file, the split files of a directory, or the TFDS dataset is not there.
      DataFieldError: records without the question or answer field (the fields are detected from the first
        record unless question_key / answer_key name them).
      DataError: anything else that makes the source unusable: a file that is not JSON / parquet, a record
        that is not an object, an empty question, an answer that does not parse, an empty source. One line,
        naming the file and the first bad record, how many are bad, and the fix.
    """
    if answer_format not in ANSWER_FORMATS:
        raise ValueError(f"answer_format {answer_format!r}; allowed: {list(ANSWER_FORMATS)}.")
    records = _read_records(source, split, data_dir)
    label = source if os.path.isfile(source) or source.startswith("tfds:") else f"{source} ({split} split)"
    if not records:
        raise DataError(f"{label} holds no records; give a file with one GSM8K / MATH-style record per line "
                        "(or a list of them).")
    objects = [r for r in records if isinstance(r.value, Mapping)]
    bad: list[_Bad] = []
    keys, detected = {}, {}
    if objects:
        decider = objects[0]
        for what, explicit, candidates in (("question", question_key, QUESTION_KEYS),
                                           ("answer", answer_key, ANSWER_KEYS)):
            keys[what], why = _first_key(decider.value, explicit, candidates, what, decider.where)
            if why is not None:
                # The field cannot be chosen: every record without any candidate field is bad.
                names = [explicit] if explicit else list(candidates)
                count = sum(not any(n in r.value for n in names) for r in objects)
                count += len(records) - len(objects)
                raise DataFieldError(f"{why.where}: {why.reason}. {_several(count, len(records))}; {why.fix}.")
            if not explicit:
                detected[what] = decider.where
    problems = []
    for index, record in enumerate(records):
        row = record.value
        if not isinstance(row, Mapping):
            fields = f"the fields {keys['question']!r} and {keys['answer']!r}" if keys else "question / answer fields"
            fix = "every record must be a JSON object: fix or remove it"
            if len(records) == 1 and isinstance(row, list) and record.where.endswith(".jsonl:1"):
                fix = "it looks like one JSON array: name it .json, or write one object per line"
            bad.append(_Bad(record.where, f"the record is {_kind(row)} ({_short(row)}), not an object with "
                            f"{fields}", fix))
            continue
        if exclude and any(row.get(field) in values for field, values in exclude.items()):
            continue
        checked, why = _check_record(record, keys["question"], keys["answer"], answer_format, detected)
        if why is not None:
            bad.append(why)
            continue
        question, answer, solution = checked
        if not solution and keys["answer"] != "solution" and isinstance(row.get("solution"), str):
            solution = row["solution"]
        uid = str(row.get("uid", row.get("id", row.get("unique_id", index))))
        problems.append(Problem(question=question.strip(), answer=answer, solution=solution, uid=uid))
    if bad:
        first = bad[0]
        error = DataFieldError if first.missing_field else DataError
        raise error(f"{first.where}: {first.reason}. {_several(len(bad), len(records))}; {first.fix}.")
    if not problems:
        raise DataError(f"Every record of {label} is excluded by exclude={dict(exclude or {})!r}; nothing is "
                        "left to train or evaluate on. Loosen the filter or use other data.")
    return problems[:limit] if limit else problems


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
