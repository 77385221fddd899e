"""Metrics sinks (TensorBoard event files without TensorFlow, Weights & Biases) and the PNG curves of a run."""

import glob
import json
import os
import struct
import subprocess
import sys
import types

import ml_collections
import pytest

from maxrl_jax import plots
from maxrl_jax import run_logging

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_MASKED_CRC = run_logging._masked_crc  # pylint: disable=protected-access

RECORDS = [
    {"phase": "sft", "step": 2, "loss": 3.0, "grad_norm": 2.5, "token_accuracy": 0.5},
    {"phase": "eval", "step": 0, "pass@1": 0.2, "pass@4": 0.5, "pass_rate": 0.2, "fraction_solved": 0.5},
    {"phase": "rl", "step": 2, "pass_rate": 0.25, "entropy": 1.5, "mean_response_length": 12.0,
     "grad_norm": 0.7, "loss": -0.1, "epoch": 0},
    {"phase": "rl", "step": 4, "pass_rate": 0.5, "entropy": 1.4, "mean_response_length": 11.0,
     "grad_norm": 0.6, "loss": -0.2, "epoch": 0},
    {"phase": "eval", "step": 4, "pass@1": 0.4, "pass@4": 0.7, "pass_rate": 0.4, "fraction_solved": 0.75},
]


def _read_events(logdir):
  """[(step, {tag: value})] of every event file in logdir, checking the TFRecord framing and CRCs."""
  events = []
  for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
    with open(path, "rb") as f:
      data = f.read()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      header, payload = data[pos:pos + 8], data[pos + 12:pos + 12 + length]
      assert struct.unpack("<I", data[pos + 8:pos + 12])[0] == _MASKED_CRC(header)
      assert struct.unpack("<I", data[pos + 12 + length:pos + 16 + length])[0] == _MASKED_CRC(payload)
      events.append(payload)
      pos += 16 + length
  return events


def _decode(payload):
  """(step, {tag: value}) of a serialized Event, through tensorboardX's generated protos when installed."""
  try:
    from tensorboardX.proto import event_pb2  # pylint: disable=import-outside-toplevel
  except ImportError:
    return None
  event = event_pb2.Event.FromString(payload)
  return event.step, {v.tag: v.simple_value for v in event.summary.value}


def test_crc32c_known_values():
  assert run_logging.crc32c(b"") == 0
  assert run_logging.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
  assert run_logging.crc32c(b"hello") == 2591144780


def test_scalars_flatten_records():
  values = run_logging.scalars({"phase": "rl", "step": 3, "pass_rate": 0.5, "name": "x", "ks": [1, 2],
                                "nested": {"a": 1, "b": {"c": 2.0}}, "flag": True})
  assert values == {"rl/pass_rate": 0.5, "rl/nested/a": 1.0, "rl/nested/b/c": 2.0, "rl/flag": 1.0}


def test_tensorboard_sink_mirrors_metrics_jsonl(tmp_path):
  sink = run_logging.TensorBoardSink(str(tmp_path / "tensorboard"))
  writer = run_logging.MetricsWriter(str(tmp_path), sinks=[sink])
  writer.truncate(lambda r: False)
  for record in RECORDS:
    writer.write(record)
  writer.close()
  assert len(writer.read()) == len(RECORDS)
  payloads = _read_events(str(tmp_path / "tensorboard"))
  assert len(payloads) == 1 + len(RECORDS)  # the file-version event, then one event per record
  decoded = [_decode(p) for p in payloads[1:]]
  if decoded[0] is not None:
    assert decoded[2] == (2, pytest.approx({"rl/pass_rate": 0.25, "rl/entropy": 1.5,
                                            "rl/mean_response_length": 12.0, "rl/grad_norm": 0.7,
                                            "rl/loss": -0.1, "rl/epoch": 0.0}))
    assert decoded[4][0] == 4 and decoded[4][1]["eval/pass@1"] == pytest.approx(0.4)

  # A resume drops the records after the checkpoint; the event files are rewritten to match.
  writer.truncate(lambda r: r["step"] <= 2)
  writer.write({"phase": "rl", "step": 4, "pass_rate": 0.45})
  writer.close()
  payloads = _read_events(str(tmp_path / "tensorboard"))
  assert len(payloads) == 1 + 3 + 1
  assert len(glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*"))) == 1


def test_tensorboard_reads_the_event_files(tmp_path):
  event_accumulator = pytest.importorskip(
      "tensorboard.backend.event_processing.event_accumulator", reason="needs the tensorboard package")
  writer = run_logging.MetricsWriter(str(tmp_path), sinks=run_logging.sinks_from_config(
      ml_collections.ConfigDict(), str(tmp_path), is_chief=True))
  for record in RECORDS:
    writer.write(record)
  writer.close()
  accumulator = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
  accumulator.Reload()
  assert {"rl/pass_rate", "eval/pass@1", "sft/loss"} <= set(accumulator.Tags()["scalars"])
  assert [(e.step, round(e.value, 6)) for e in accumulator.Scalars("rl/pass_rate")] == [(2, 0.25), (4, 0.5)]


def test_sinks_from_config(tmp_path, monkeypatch):
  kinds = lambda sinks: [type(s).__name__ for s in sinks]
  assert kinds(run_logging.sinks_from_config(ml_collections.ConfigDict(), str(tmp_path), True)) == [
      "TensorBoardSink"]
  config = ml_collections.ConfigDict({"logging": {"tensorboard": False, "wandb": False, "wandb_project": ""}})
  assert run_logging.sinks_from_config(config, str(tmp_path), True) == []
  assert run_logging.sinks_from_config(ml_collections.ConfigDict(), str(tmp_path), is_chief=False) == []
  monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
  config.logging.wandb = True
  with pytest.raises(ImportError, match="pip install wandb"):
    run_logging.sinks_from_config(config, str(tmp_path), True)


def test_logging_fields_may_change_on_resume(tmp_path):
  config = {"seed": 0, "logging": {"tensorboard": True, "wandb": False}}
  run_logging.check_or_write_config(str(tmp_path), config)
  run_logging.check_or_write_config(str(tmp_path), {"seed": 0, "logging": {"tensorboard": False, "wandb": True}})
  with pytest.raises(ValueError, match="seed"):
    run_logging.check_or_write_config(str(tmp_path), {"seed": 1, "logging": {"wandb": True}})


def test_wandb_sink_with_a_stand_in_module(tmp_path, monkeypatch):
  calls = {"init": [], "define": [], "log": [], "finish": 0}

  class Run:
    def define_metric(self, name, step_metric=None):
      calls["define"].append((name, step_metric))

    def log(self, payload):
      calls["log"].append(payload)

    def finish(self):
      calls["finish"] += 1

  def init(**kwargs):
    calls["init"].append(kwargs)
    return Run()

  fake = types.SimpleNamespace(init=init)
  monkeypatch.setitem(sys.modules, "wandb", fake)
  config = ml_collections.ConfigDict({"seed": 0, "logging": {"tensorboard": False, "wandb": True,
                                                              "wandb_project": "proj"}})
  sinks = run_logging.sinks_from_config(config, str(tmp_path), True)
  writer = run_logging.MetricsWriter(str(tmp_path), sinks=sinks)
  for record in RECORDS[:3]:
    writer.write(record)
  writer.close()
  run_id = (tmp_path / "wandb_run_id").read_text().strip()
  assert calls["init"][0]["project"] == "proj" and calls["init"][0]["id"] == run_id and len(run_id) == 8
  assert calls["init"][0]["resume"] == "allow" and calls["init"][0]["config"]["seed"] == 0
  assert ("rl/*", "rl/step") in calls["define"] and ("eval/*", "eval/step") in calls["define"]
  assert calls["log"][2] == {**run_logging.scalars(RECORDS[2]), "rl/step": 2}
  assert calls["finish"] == 1
  # A resumed run continues the same W&B run.
  run_logging.sinks_from_config(config, str(tmp_path), True)[0].close()
  assert calls["init"][1]["id"] == run_id


def test_wandb_offline_run(tmp_path):
  pytest.importorskip("wandb", reason="Weights & Biases is optional")
  code = (
      "import ml_collections\n"
      "from maxrl_jax import run_logging\n"
      "config = ml_collections.ConfigDict({'logging': {'tensorboard': False, 'wandb': True, "
      "'wandb_project': 'test'}})\n"
      f"writer = run_logging.MetricsWriter({str(tmp_path)!r}, run_logging.sinks_from_config(config, "
      f"{str(tmp_path)!r}, True))\n"
      f"for record in {RECORDS!r}:\n"
      "  writer.write(record)\n"
      "writer.close()\n")
  env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DISABLE_GIT": "true",
         "WANDB_CONFIG_DIR": str(tmp_path / "wandb_config"), "WANDB_CACHE_DIR": str(tmp_path / "wandb_cache")}
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  run_id = (tmp_path / "wandb_run_id").read_text().strip()
  assert glob.glob(str(tmp_path / "wandb" / f"offline-run-*-{run_id}" / f"run-{run_id}.wandb"))


def test_plot_run_draws_what_the_run_logged(tmp_path):
  assert plots.plot_run(str(tmp_path)) == []  # no metrics.jsonl: nothing to draw
  with open(tmp_path / "metrics.jsonl", "w") as f:
    for record in RECORDS:
      f.write(json.dumps(record) + "\n")
    f.write('{"phase": "rl", "step": 6, "pass_ra')  # a line cut by a kill is ignored
  (tmp_path / "config.json").write_text(json.dumps({"task": "maze", "preset": "tiny",
                                                     "objective": {"name": "maxrl"}}))
  paths = plots.plot_run(str(tmp_path))
  assert sorted(os.path.basename(p) for p in paths) == ["curves_heldout.png", "curves_rl.png",
                                                        "curves_sft.png"]
  for path in paths:
    with open(path, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(path) > 5000


def test_plots_command_line(tmp_path):
  with open(tmp_path / "metrics.jsonl", "w") as f:
    for step in range(0, 60, 10):
      f.write(json.dumps({"phase": "eval", "step": step, **{f"pass@{k}": min(1.0, 0.01 * k + step / 100)
                                                             for k in (1, 2, 4, 8, 16, 32, 64, 128, 256)}})
              + "\n")
  out = subprocess.run([sys.executable, "-m", "maxrl_jax.plots", f"--workdir={tmp_path}"], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip() == str(tmp_path / "curves_heldout.png")
