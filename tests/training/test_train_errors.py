"""User mistakes end in one clear sentence and a non-zero exit, before anything compiles."""

import json
import os
import subprocess

import pytest

from tinystories_jax.training import config as config_lib
from train_helpers import cli_env, tiny_config, tiny_overrides, train_cmd


def _fail(workdir, overrides, config="configs/quickstart.py"):
  proc = subprocess.run(train_cmd(workdir, overrides, config), env=cli_env(), text=True,
                        capture_output=True, timeout=300)
  assert proc.returncode != 0
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error: ")]
  assert len(errors) == 1, proc.stderr[-3000:]
  # Nothing was compiled or trained: no checkpoints, no metrics.
  assert not os.path.exists(os.path.join(workdir, "checkpoints"))
  assert not os.path.exists(os.path.join(workdir, "metrics.jsonl"))
  return errors[0]


@pytest.mark.parametrize("extra, expected", [
    ({"mesh.cpu_devices": 4, "mesh.data": 3, "mesh.fsdp": -1},
     "does not divide the 4 available devices"),
    ({"mesh.cpu_devices": 4, "mesh.data": 4, "train.batch_size": 6},
     "train.batch_size=6 does not divide over the mesh's data axes"),
    ({"train.stepz": 3}, "--config.train.stepz: invalid config override"),
    ({"model.name": "7b"}, "model.name='7b'"),
    ({"train.loss": "sparse"}, "train.loss='sparse' is not one of"),
    ({"train.loss_kernel": "triton"}, "train.loss_kernel='triton' is not one of"),
    ({"train.loss": "chunked", "train.loss_kernel": "xla_online"},
     "train.loss_kernel='xla_online' applies to train.loss='fused', not 'chunked'"),
    ({"train.loss_kernel": "pallas"},
     "train.loss_kernel='pallas' cannot run here: the Pallas loss kernels run on GPUs, not 'cpu'"),
    ({"model.norm": "pallas"},
     "model.norm='pallas' cannot run here: the Pallas RMSNorm kernels run on GPUs, not 'cpu'"),
    ({"model.norm": "triton"}, "model.norm='triton' is not one of ('xla', 'pallas')"),
    ({"model.qkv": "pallas"},
     "model.qkv='pallas' runs in the GPU attention kernels, and this machine is 'cpu'"),
    ({"model.qkv": "fused"}, "model.qkv='fused' is not one of ('xla', 'pallas')"),
    ({"model.mlp": "pallas"},
     "model.mlp='pallas' cannot run here: the Pallas SwiGLU kernel runs on GPUs, not 'cpu'"),
    ({"model.mlp": "fused"}, "model.mlp='fused' is not one of ('xla', 'pallas')"),
    ({"optimizer.flatten_below": -1}, "optimizer.flatten_below must be >= 0"),
    ({"mesh.cpu_devices": 2, "mesh.data": 1, "mesh.fsdp": 2, "optimizer.flatten_below": 1 << 20},
     "optimizer.flatten_below flattens"),
    ({"model.attention": "cudnn"},
     "model.attention='cudnn' cannot run this model here: cuDNN attention needs an NVIDIA GPU"),
    ({"model.attention": "pallas"},
     "model.attention='pallas' cannot run this model here: pallas flash attention supports "
     "head_dim"),
])
def test_bad_input_is_one_sentence(tiny_data, tmp_path, extra, expected):
  line = _fail(str(tmp_path / "w"), tiny_overrides(tiny_data, **extra))
  assert expected in line, line


def test_missing_data_directory(tmp_path):
  line = _fail(str(tmp_path / "w"), tiny_overrides(tmp_path / "nowhere"))
  assert "not a prepared data directory" in line and "prepare" in line


def test_workdir_from_another_run_is_refused(tiny_data, tmp_path):
  workdir = tmp_path / "w"
  workdir.mkdir()
  run = config_lib.run_config(tiny_config(tiny_data))
  from tinystories_jax.training import loop  # pylint: disable=import-outside-toplevel
  r = loop.prepare_run(run, str(workdir))
  (workdir / "config.json").write_text(json.dumps(r.config_json))
  line = _fail(str(workdir), tiny_overrides(tiny_data, **{"optimizer.lr": 0.5}))
  assert "holds a run with a different configuration (optimizer.lr was 0.01, now 0.5)" in line
  # Changing only how the run is run (length, logging, mesh) is a resume, not a conflict.
  saved = json.loads((workdir / "config.json").read_text())
  run2 = config_lib.run_config(tiny_config(tiny_data, **{"train.steps": 99, "mesh.data": 8}))
  config_lib.check_workdir_config(saved, loop.prepare_run(run2, str(tmp_path / "x")).config_json,
                                  str(workdir))
  # A workdir of an older version recorded train.loss_online_lse, since replaced by
  # train.loss_kernel: both say how the loss is computed, not what, so it still resumes.
  older = json.loads(json.dumps(saved))
  del older["train"]["loss_kernel"]
  older["train"]["loss_online_lse"] = True
  config_lib.check_workdir_config(older, loop.prepare_run(run2, str(tmp_path / "y")).config_json,
                                  str(workdir))
  # One written before optimizer.flatten_below existed ran every parameter alone: it resumes
  # with that setting (0) and refuses another, whose optimizer state has another layout.
  del older["optimizer"]["flatten_below"]
  config_lib.check_workdir_config(older, loop.prepare_run(run2, str(tmp_path / "z")).config_json,
                                  str(workdir))
  run3 = config_lib.run_config(tiny_config(tiny_data, **{"optimizer.flatten_below": 4096}))
  with pytest.raises(config_lib.ConfigError, match="optimizer.flatten_below was 0, now 4096"):
    config_lib.check_workdir_config(
        older, loop.prepare_run(run3, str(tmp_path / "v")).config_json, str(workdir))


def test_resume_on_data_with_another_tokenizer_is_refused(tiny_data, tmp_path):
  """data.dir may move on a resume, but the token ids must mean what they meant: another
  tokenizer is refused before the workdir's own tokenizer.model is touched."""
  import shutil  # pylint: disable=import-outside-toplevel
  from tinystories_jax.data import pipeline, preparation  # pylint: disable=import-outside-toplevel
  from tinystories_jax.training import loop  # pylint: disable=import-outside-toplevel
  other = tmp_path / "other"
  preparation.prepare(preparation.PrepareOptions(inputs="synthetic", output_dir=str(other),
                                                 vocab_size=512, synthetic_stories=300, seed=1))
  workdir = tmp_path / "w"
  workdir.mkdir()
  ours = pipeline.PreparedData.load(tiny_data).tokenizer_path
  shutil.copyfile(ours, workdir / "tokenizer.model")
  before = (workdir / "tokenizer.model").read_bytes()
  copy = tmp_path / "copy"  # the same data elsewhere: accepted
  shutil.copytree(tiny_data, copy)
  loop.prepare_run(config_lib.run_config(tiny_config(copy)), str(workdir))
  with pytest.raises(config_lib.ConfigError, match="was tokenized with another tokenizer"):
    loop.prepare_run(config_lib.run_config(tiny_config(other)), str(workdir))
  assert (workdir / "tokenizer.model").read_bytes() == before
