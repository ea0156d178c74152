"""End to end on a tiny synthetic corpus: learning, checkpoints, metrics, resume, divergence."""

import json
import os

import jax
import numpy as np
import pytest

from tinystories_jax.training import config as config_lib
from tinystories_jax.training import loop
from tinystories_jax.training import loss as loss_lib
from train_helpers import tiny_config


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_train_learns_logs_checkpoints_and_resumes(tiny_data, tmp_path):
  workdir = str(tmp_path / "run")
  run = config_lib.run_config(tiny_config(tiny_data, **{"train.steps": 36}))
  last = loop.train(run, workdir)
  rows = _rows(workdir)
  assert [r["step"] for r in rows] == list(range(4, 37, 4))
  first, final = rows[0], rows[-1]
  assert final is not None and last["step"] == 36
  # Starts near ln(512) = 6.24 and falls well below it (36 tiny steps reach the unigram level).
  assert first["train_loss"] > 5.5
  assert final["train_loss"] < first["train_loss"] - 0.8
  for key in ("learning_rate", "grad_norm", "tokens_per_s", "model_tflops"):
    assert key in rows[1], key
  evals = [r for r in rows if "eval_loss" in r]
  assert [r["step"] for r in evals] == [12, 24, 36]
  assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
  assert 0 < evals[-1]["eval_bpb"] < evals[0]["eval_bpb"]
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["24", "30", "36"]
  saved = json.load(open(os.path.join(workdir, "config.json")))
  assert saved["model"]["family"] == "llama" and saved["model"]["vocab_size"] == 512
  assert saved["train"]["steps"] == 36
  assert os.path.isfile(os.path.join(workdir, "tokenizer.model"))
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(
      os.path.join(workdir, "tensorboard")))

  # Extending the run resumes from step 36 instead of starting over.
  run = config_lib.run_config(tiny_config(tiny_data, **{"train.steps": 40}))
  loop.train(run, workdir)
  rows = _rows(workdir)
  assert [r["step"] for r in rows][-2:] == [36, 40]
  assert rows[-1]["train_loss"] < first["train_loss"] - 0.8
  # A finished run is left alone.
  assert loop.train(run, workdir) == {"step": 40}


def test_nan_loss_stops_with_the_last_good_checkpoint(tiny_data, tmp_path):
  workdir = str(tmp_path / "nan")
  run = config_lib.run_config(tiny_config(tiny_data, **{
      "optimizer.lr": 1e30, "optimizer.warmup_steps": 0, "optimizer.clip_norm": 0.0,
      "train.checkpoint_every": 1, "train.log_every": 1, "train.steps": 8}))
  with pytest.raises(loop.TrainingDiverged, match="last good checkpoint intact") as e:
    loop.train(run, workdir)
  steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")))
  assert steps and f"step {steps[-1]}" in str(e.value)
  rows = _rows(workdir)
  assert all(np.isfinite(r["train_loss"]) for r in rows)


def test_nan_loss_can_skip_the_update(tiny_data, tmp_path):
  workdir = str(tmp_path / "skip")
  run = config_lib.run_config(tiny_config(tiny_data, **{
      "optimizer.lr": 1e30, "optimizer.warmup_steps": 0, "optimizer.clip_norm": 0.0,
      "train.on_nonfinite": "skip", "train.steps": 8, "train.eval_every": 0}))
  loop.train(run, workdir)
  rows = _rows(workdir)
  assert rows[-1]["step"] == 8 and rows[-1]["skipped_steps"] >= 1


def test_packed_stories_train(tiny_data, tmp_path):
  workdir = str(tmp_path / "packed")
  run = config_lib.run_config(tiny_config(tiny_data, **{
      "data.packed": True, "train.steps": 8, "train.eval_every": 0, "train.log_every": 4}))
  last = loop.train(run, workdir)
  rows = _rows(workdir)
  assert [r["step"] for r in rows] == [4, 8]
  assert np.isfinite(last["train_loss"]) and last["train_loss"] < rows[0]["train_loss"] + 0.5
  assert np.isfinite(last["eval_loss"])


def test_the_data_iterator_is_closed_at_the_end(tiny_data, tmp_path, monkeypatch):
  """Grain's worker processes (data.worker_count > 0) stop with the run, not at exit."""
  from tinystories_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  made, real = [], pipeline.make_iterator

  def spy(*args, **kwargs):
    made.append(real(*args, **kwargs))
    return made[-1]

  monkeypatch.setattr(pipeline, "make_iterator", spy)
  run = config_lib.run_config(tiny_config(tiny_data, **{
      "train.steps": 2, "train.eval_every": 0, "train.log_every": 1}))
  loop.train(run, str(tmp_path / "run"))
  assert len(made) == 1
  with pytest.raises(ValueError, match="closed"):  # a closed Grain iterator refuses
    next(made[0])


def test_loss_kernel_auto_is_resolved_once_for_the_run(tiny_data, tmp_path, monkeypatch):
  calls, real = [], loss_lib.resolve_kernel

  def spy(kernel, padded_vocab_size, backend=None, *, tensor_split=None):
    out = real(kernel, padded_vocab_size, backend, tensor_split=tensor_split)
    calls.append((kernel, backend, tensor_split, out))
    return out

  monkeypatch.setattr(loss_lib, "resolve_kernel", spy)
  run = config_lib.run_config(tiny_config(tiny_data, **{
      "train.steps": 2, "train.eval_every": 0, "train.log_every": 1}))
  assert run.train.loss_kernel == "auto" and run.train.loss == "fused"
  loop.train(run, str(tmp_path / "run"))
  # The loop resolves "auto" for its mesh's devices (this CPU, no tensor axis) ...
  assert calls[0] == ("auto", "cpu", False, "xla")
  # ... and the traced steps get what it resolved, not "auto" again.
  assert len(calls) > 1 and all(c[0] == "xla" for c in calls[1:])


def test_training_continues_from_an_imported_workdir(tiny_data, tmp_path):
  """A workdir written by `interop` (config.json with the model, params-only checkpoint)."""
  import jax  # pylint: disable=import-outside-toplevel
  from tinystories_jax.interop import workdir as interop_workdir  # pylint: disable=import-outside-toplevel
  workdir = tmp_path / "imported"
  run = config_lib.run_config(tiny_config(tiny_data, **{
      "train.steps": 4, "train.log_every": 1, "train.eval_every": 0}))
  model_cfg = loop.prepare_run(run, str(tmp_path / "probe")).model_cfg
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: rng.normal(0, 0.02, s.shape).astype(s.dtype),
                        interop_workdir.abstract_params(model_cfg))
  # A distinctive (sharp) output layer: the first loss shows these parameters were used.
  params["embedding"] = params["embedding"] * 400
  params["final_norm"]["scale"] = params["final_norm"]["scale"] * 0 + 20.0
  interop_workdir.write_workdir(workdir, model_cfg, params, tokenizer={"kind": "sentencepiece"})
  loop.train(run, str(workdir))
  rows = _rows(workdir)
  assert [r["step"] for r in rows] == [1, 2, 3, 4]  # a fresh optimizer from step 0
  assert rows[0]["train_loss"] > 9  # far above ln(512) = 6.2 of a fresh initialisation
  assert sorted(int(s) for s in os.listdir(workdir / "checkpoints")) == [0, 4]
  # Resuming now continues the trained run, not the imported starting point.
  run = config_lib.run_config(tiny_config(tiny_data, **{
      "train.steps": 6, "train.log_every": 1, "train.eval_every": 0}))
  loop.train(run, str(workdir))
  assert [r["step"] for r in _rows(workdir)][4:] == [5, 6]


def test_flat_optimizer_state_checkpoints_and_resumes_exactly(tiny_data, tmp_path):
  """optimizer.flatten_below keeps the flattened parameters' moments as flat vectors: they
  save and restore with the checkpoint, and a resumed run equals an uninterrupted one."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  over = {"optimizer.flatten_below": 1 << 20, "optimizer.schedule": "constant",
          "train.eval_every": 0, "train.checkpoint_every": 4}
  straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
  loop.train(config_lib.run_config(tiny_config(tiny_data, **over, **{"train.steps": 12})),
             straight)
  loop.train(config_lib.run_config(tiny_config(tiny_data, **over, **{"train.steps": 8})), split)
  opt = ocp.StandardCheckpointer().restore(os.path.join(split, "checkpoints", "8", "opt_state"))
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(opt)]
  assert any("['flat']['decayed_float32']" in p for p in paths), paths
  loop.train(config_lib.run_config(tiny_config(tiny_data, **over, **{"train.steps": 12})), split)
  a, b = (ocp.StandardCheckpointer().restore(os.path.join(w, "checkpoints", "12", "params"))
          for w in (straight, split))
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y),
                                  err_msg=jax.tree_util.keystr(path))
  assert [r["step"] for r in _rows(split)][-2:] == [8, 12]
