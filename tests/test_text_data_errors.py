"""Bad data sources of the text trainer are refused before training, in one line naming file, record and fix.

Each case goes through `text.data.load_problems`, the loader the text trainer's `resolve_data` calls; the last
test runs the trainer's command line on a bad file.
"""

import builtins
import json
import os
import subprocess
import sys

import pytest

from maxrl_jax.text import data as data_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = [{"question": f"What is {i} + 1?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"} for i in range(12)]


def _jsonl(path, rows, raw_lines=None):
  """Writes rows as JSONL; raw_lines {index: text} replaces some lines verbatim."""
  with open(path, "w") as f:
    for i, row in enumerate(rows):
      f.write((raw_lines or {}).get(i, json.dumps(row)) + "\n")
  return str(path)


def _refused(source, error=data_lib.DataError, **kwargs):
  """The one-line message of the error `load_problems(source, **kwargs)` raises."""
  with pytest.raises(error) as info:
    data_lib.load_problems(str(source), **kwargs)
  message = str(info.value)
  assert isinstance(info.value, ValueError)  # main prints ValueErrors as one "error:" line
  assert "\n" not in message, message
  return message


# ------------------------------------------------------------------------------------------------ records


def test_a_record_that_is_not_an_object_is_named_by_file_and_line(tmp_path):
  path = _jsonl(tmp_path / "train.jsonl", ROWS, {9: "[1, 2]"})
  message = _refused(path)
  assert message.startswith(f"{path}:10: the record is a JSON array ([1, 2]), not an object")
  assert "1 of 12 records is bad" in message and "fix or remove it" in message


def test_a_record_without_the_detected_field_is_a_field_error(tmp_path):
  rows = [{"problem": f"Q{i}?", "answer": str(i)} for i in range(12)]
  rows[9] = {"prompt": "Q9?", "answer": "9"}
  message = _refused(_jsonl(tmp_path / "math.jsonl", rows), data_lib.DataFieldError)
  assert ":10: no question field 'problem'" in message and "detected from the first record" in message
  assert "1 of 12 records is bad" in message and "question_key" in message
  with pytest.raises(KeyError):  # still a KeyError for callers that catch one
    data_lib.load_problems(str(tmp_path / "math.jsonl"))


def test_sources_without_the_field_at_all(tmp_path):
  pa = pytest.importorskip("pyarrow")
  pq = pytest.importorskip("pyarrow.parquet")
  rows = [{"text": "What is 1 + 1?", "label": "2"}] * 4
  message = _refused(_jsonl(tmp_path / "x.jsonl", rows), data_lib.DataFieldError)
  assert message.startswith(f"{tmp_path / 'x.jsonl'}:1: no question field among ['question', 'problem'")
  assert "4 of 4 records are bad" in message and "question_key" in message
  pq.write_table(pa.Table.from_pylist(rows), str(tmp_path / "x.parquet"))
  message = _refused(tmp_path / "x.parquet", data_lib.DataFieldError)
  assert message.startswith(f"{tmp_path / 'x.parquet'}, row 0 (0-based): no question field among")
  message = _refused(tmp_path / "x.jsonl", data_lib.DataFieldError, question_key="text", answer_key="answer")
  assert "no answer field 'answer'" in message and "fields: ['label', 'text']" in message


def test_every_bad_record_is_counted_and_the_first_named(tmp_path):
  rows = [dict(r) for r in ROWS]
  rows[3]["question"] = "   "
  rows[5]["answer"] = None
  rows[7]["answer"] = "no final answer here"
  message = _refused(_jsonl(tmp_path / "gsm8k.jsonl", rows), answer_format="gsm8k")
  assert message.startswith(f"{tmp_path / 'gsm8k.jsonl'}:4: the question field 'question' is empty")
  assert "3 of 12 records are bad (the first is shown)" in message


@pytest.mark.parametrize("field,value,reason", [
    ("question", None, "the question field 'question' is null (None), not a string"),
    ("question", ["a"], "the question field 'question' is a JSON array"),
    ("answer", True, "the answer field 'answer' is a boolean (True)"),
    ("answer", {"value": 3}, "the answer field 'answer' is a dict"),
    ("answer", float("nan"), "the answer field 'answer' is a non-finite number (nan)"),
    ("answer", "", "the answer field 'answer' is empty"),
    ("answer", "#### ", "the answer field 'answer' gives an empty final answer"),
])
def test_field_values_must_be_usable(tmp_path, field, value, reason):
  rows = [dict(r) for r in ROWS]
  rows[6][field] = value
  message = _refused(_jsonl(tmp_path / "train.jsonl", rows))
  assert message.startswith(f"{tmp_path / 'train.jsonl'}:7: {reason}"), message


def test_numeric_answers_are_accepted(tmp_path):
  rows = [{"question": "Two times 36?", "answer": 72}, {"question": "Half of 3?", "answer": 1.5}]
  assert [p.answer for p in data_lib.load_problems(_jsonl(tmp_path / "n.jsonl", rows))] == ["72", "1.5"]


@pytest.mark.parametrize("answer_format,answer,reason", [
    ("gsm8k", "42", "does not parse as gsm8k (GSM8K answer without '####'"),
    ("boxed", "It is 42.", "does not parse as boxed (No \\boxed{...}"),
    ("boxed", "\\boxed{ }", "gives an empty final answer"),
])
def test_answers_must_parse_for_the_answer_format(tmp_path, answer_format, answer, reason):
  rows = [{"question": "Q?", "answer": "\\boxed{1} #### 1"}] * 3 + [{"question": "Q?", "answer": answer}]
  message = _refused(_jsonl(tmp_path / "a.jsonl", rows), answer_format=answer_format)
  assert message.startswith(f"{tmp_path / 'a.jsonl'}:4: "), message
  assert reason in message, message


def test_excluded_records_are_not_checked_but_limit_checks_everything(tmp_path):
  rows = [dict(r, status="ok") for r in ROWS]
  rows[4] = {"question": "", "answer": None, "status": "rejected"}
  path = _jsonl(tmp_path / "train.jsonl", rows)
  assert len(data_lib.load_problems(path, exclude={"status": ["rejected"]})) == 11
  assert "excluded" in _refused(path, exclude={"status": ["ok", "rejected"]})
  message = _refused(path, limit=2)  # a bad record beyond the limit still refuses the file
  assert f"{path}:5:" in message


# ------------------------------------------------------------------------------------------------ files


def test_malformed_and_non_utf8_lines(tmp_path):
  message = _refused(_jsonl(tmp_path / "t.jsonl", ROWS, {4: '{"question": "x", ', 8: "{oops"}))
  assert message.startswith(f"{tmp_path / 't.jsonl'}:5 is not valid JSON (")
  assert "2 of 12 lines are bad" in message
  (tmp_path / "latin1.jsonl").write_bytes(json.dumps(ROWS[0]).encode() + b"\n" +
                                          '{"question": "caf\xe9?", "answer": "1"}'.encode("latin-1") + b"\n")
  message = _refused(tmp_path / "latin1.jsonl")
  assert message.startswith(f"{tmp_path / 'latin1.jsonl'}:2 is not UTF-8 text") and "save the file as UTF-8" in message


def test_json_arrays_and_jsonl_mixed_up(tmp_path):
  (tmp_path / "one_line.jsonl").write_text(json.dumps(ROWS))
  assert "looks like one JSON array: name it .json" in _refused(tmp_path / "one_line.jsonl")
  (tmp_path / "pretty.jsonl").write_text(json.dumps(ROWS, indent=1))
  assert "looks like one JSON array: name it .json" in _refused(tmp_path / "pretty.jsonl")
  _jsonl(tmp_path / "lines.json", ROWS)
  message = _refused(tmp_path / "lines.json")
  assert message.startswith(f"{tmp_path / 'lines.json'}:2 is not valid JSON (Extra data") and "name it .jsonl" in message
  (tmp_path / "s.json").write_text('"just a string"')
  assert "holds a JSON str, not a list of records" in _refused(tmp_path / "s.json")
  (tmp_path / "two.json").write_text('{"train": [], "test": []}')
  assert "must hold exactly one list of records (it holds 2" in _refused(tmp_path / "two.json")
  (tmp_path / "wrapped.json").write_text(json.dumps({"data": ROWS[:3] + [7]}))
  message = _refused(tmp_path / "wrapped.json")
  assert message.startswith(f"{tmp_path / 'wrapped.json'}, 'data' item 3 (0-based): the record is a number (7)")
  (tmp_path / "ok.json").write_text(json.dumps(ROWS))
  assert len(data_lib.load_problems(str(tmp_path / "ok.json"))) == 12


def test_missing_empty_and_unsupported_sources(tmp_path):
  for source, match in ((tmp_path / "nope.jsonl", r"does not exist \(nothing is downloaded\)"),
                        (tmp_path, "No 'train' split in .* It is empty")):
    with pytest.raises(data_lib.DataFileNotFoundError, match=match) as info:
      data_lib.load_problems(str(source))
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, ValueError)
  (tmp_path / "train.csv").write_text("question,answer\n")
  with pytest.raises(FileNotFoundError, match="It holds: train.csv"):
    data_lib.load_problems(str(tmp_path))
  assert "unsupported file type" in _refused(tmp_path / "train.csv") and "Convert it to JSONL" in _refused(
      tmp_path / "train.csv")
  (tmp_path / "t.jsonl.gz").write_bytes(b"\x1f\x8b")
  assert "Decompress it first" in _refused(tmp_path / "t.jsonl.gz")
  (tmp_path / "empty.jsonl").write_text("\n\n")
  assert "holds no records" in _refused(tmp_path / "empty.jsonl")
  assert "The data source is ''" in _refused("")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_an_unreadable_file(tmp_path):
  path = _jsonl(tmp_path / "train.jsonl", ROWS)
  os.chmod(path, 0)
  assert "cannot be read (Permission denied)" in _refused(path)


def test_parquet_files_that_cannot_be_read(tmp_path, monkeypatch):
  pytest.importorskip("pyarrow")
  (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
  message = _refused(tmp_path / "bad.parquet")
  assert message.startswith(f"{tmp_path / 'bad.parquet'} is not a readable parquet file (")
  real_import = builtins.__import__

  def no_pyarrow(name, *args, **kwargs):
    if name.startswith("pyarrow"):
      raise ImportError("No module named 'pyarrow'")
    return real_import(name, *args, **kwargs)

  monkeypatch.setattr(builtins, "__import__", no_pyarrow)
  assert "needs pyarrow: pip install pyarrow" in _refused(tmp_path / "bad.parquet")


def test_tfds_sources_that_cannot_be_opened(tmp_path, monkeypatch):
  pytest.importorskip("tensorflow_datasets")
  assert "TFDS dataset 'bad name' cannot be opened" in _refused("tfds:bad name:train", data_dir=str(tmp_path))
  with pytest.raises(data_lib.DataFileNotFoundError, match="is not a prepared TFDS dataset directory"):
    data_lib.load_problems(f"tfds:{tmp_path / 'missing' / '1.0.0'}:test")
  with pytest.raises(data_lib.DataFileNotFoundError, match="not prepared"):
    data_lib.load_problems("tfds:maxrl_no_such_dataset:train", data_dir=str(tmp_path))
  assert "names no TFDS dataset" in _refused("tfds::train")
  real_import = builtins.__import__

  def no_tfds(name, *args, **kwargs):
    if name.startswith("tensorflow_datasets"):
      raise ImportError("No module named 'tensorflow_datasets'")
    return real_import(name, *args, **kwargs)

  monkeypatch.setattr(builtins, "__import__", no_tfds)
  assert "needs tensorflow-datasets" in _refused("tfds:my_gsm8k:train")


def test_a_directory_names_the_file_of_the_bad_record(tmp_path):
  os.makedirs(tmp_path / "main")
  _jsonl(tmp_path / "main" / "test.jsonl", ROWS, {2: '"a string"'})
  message = _refused(tmp_path, split="test")
  assert message.startswith(f"{tmp_path / 'main' / 'test.jsonl'}:3: the record is a string ('a string')")


# ------------------------------------------------------------------------------------------------ end to end


def test_the_trainer_stops_with_one_error_line(tmp_path):
  bad = _jsonl(tmp_path / "bad.jsonl", ROWS, {9: "[1, 2]"})
  command = [sys.executable, "-m", "maxrl_jax.main", "--config=configs/gsm8k_smollm2.py:tiny",
             "--config.data.synthetic=False", f"--config.data.train_path={bad}", f"--workdir={tmp_path / 'run'}"]
  env = {k: v for k, v in os.environ.items() if k != "MAXRL_TRACEBACK"}
  result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  assert "Traceback" not in result.stderr, result.stderr
  errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and errors[0].startswith(f"error: {bad}:10: the record is a JSON array"), result.stderr
  assert not os.path.exists(tmp_path / "run" / "checkpoints")
  traced = subprocess.run(command, cwd=REPO, env={**env, "MAXRL_TRACEBACK": "1"}, capture_output=True, text=True,
                          timeout=300)
  assert traced.returncode != 0 and "Traceback" in traced.stderr and "DataError" in traced.stderr
