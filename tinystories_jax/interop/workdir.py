"""The checkpointed workdir, as far as interop needs it (`docs/models.md` has the layout).

    WORKDIR/config.json                 {"model": ModelConfig.to_dict(),
                                         "data": {"tokenizer": {...}}, ...}
    WORKDIR/checkpoints/<step>/params   Orbax item "params": the model's nnx.Param state as a
                                         pure dict (string keys, float32 numpy/jax arrays)
    WORKDIR/tokenizer.model             SentencePiece model (or the HF tokenizer files)

The trainer's checkpoints hold more items (optimizer state, step, data iterator); readers here
restore only "params".
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from tinystories_jax import models
from tinystories_jax.models.config import ModelConfig

CONFIG_FILE = "config.json"
CHECKPOINTS = "checkpoints"
PARAMS_ITEM = "params"


class WorkdirError(ValueError):
  """A workdir is missing, incomplete or already in use."""


def string_keys(tree: Any) -> Any:
  """Nested dicts with every key a string (nnx uses ints for list entries; Orbax stores strings)."""
  if isinstance(tree, dict):
    return {str(k): string_keys(v) for k, v in tree.items()}
  return tree


def model_params(model: nnx.Module) -> dict:
  """The model's parameters as a pure dict with string keys."""
  return string_keys(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def abstract_params(cfg: ModelConfig) -> dict:
  """ShapeDtypeStructs of `model_params(build(cfg))`, without allocating anything."""
  model = nnx.eval_shape(lambda: models.build(cfg, nnx.Rngs(0)))
  return model_params(model)


def write_workdir(workdir: str | os.PathLike, cfg: ModelConfig, params: dict, *,
                  tokenizer: dict, files: dict[str, str] | None = None, step: int = 0,
                  extra: dict | None = None) -> pathlib.Path:
  """Writes config.json, tokenizer files and an Orbax checkpoint holding only "params".

  Args:
    workdir: created if absent; must not already hold checkpoints.
    cfg: the model's config.
    params: pure dict matching `abstract_params(cfg)` (numpy or jax arrays).
    tokenizer: recorded as config["data"]["tokenizer"].
    files: {name in workdir: source path} copied alongside (tokenizer files).
    step: checkpoint step.
    extra: further top-level config.json entries (e.g. where the weights came from).
  """
  workdir = pathlib.Path(workdir).absolute()
  ckpt_dir = workdir / CHECKPOINTS
  if ckpt_dir.is_dir() and any(ckpt_dir.iterdir()):
    raise WorkdirError(f"{workdir} already holds checkpoints; choose an empty workdir.")
  check_params(cfg, params)
  workdir.mkdir(parents=True, exist_ok=True)
  for name, src in (files or {}).items():
    shutil.copyfile(src, workdir / name)
  config = {"model": cfg.to_dict(), "data": {"tokenizer": tokenizer}}
  config.update(extra or {})
  (workdir / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
  params = jax.tree.map(np.asarray, string_keys(params))
  with ocp.CheckpointManager(ckpt_dir) as mngr:
    mngr.save(step, args=ocp.args.Composite(**{PARAMS_ITEM: ocp.args.StandardSave(params)}))
    mngr.wait_until_finished()
  return workdir


def check_params(cfg: ModelConfig, params: dict) -> None:
  """Raises WorkdirError unless `params` has exactly the tree and shapes `cfg` builds."""
  want = abstract_params(cfg)
  got = string_keys(params)
  want_flat = {"/".join(map(str, k)): v for k, v in _flatten(want)}
  got_flat = {"/".join(map(str, k)): v for k, v in _flatten(got)}
  missing = sorted(set(want_flat) - set(got_flat))
  unknown = sorted(set(got_flat) - set(want_flat))
  if missing or unknown:
    raise WorkdirError(f"parameters do not match the model config: missing {missing[:5]}, "
                       f"unexpected {unknown[:5]}.")
  for name, spec in want_flat.items():
    if tuple(got_flat[name].shape) != tuple(spec.shape):
      raise WorkdirError(f"parameter {name} has shape {tuple(got_flat[name].shape)} but the "
                         f"model config needs {tuple(spec.shape)}.")


def _flatten(tree, prefix=()):
  if isinstance(tree, dict):
    for k, v in tree.items():
      yield from _flatten(v, prefix + (k,))
  else:
    yield prefix, tree


def read_config(workdir: str | os.PathLike) -> dict:
  """config.json of a workdir, as a dict."""
  path = pathlib.Path(workdir) / CONFIG_FILE
  if not path.is_file():
    raise WorkdirError(f"{workdir} has no {CONFIG_FILE}; pass the workdir of a training run or "
                       "of `interop import-hf`.")
  config = json.loads(path.read_text())
  if "model" not in config:
    raise WorkdirError(f"{path} has no 'model' entry; it was not written by tinystories-jax.")
  return config


def read_workdir(workdir: str | os.PathLike, step: int | None = None
                 ) -> tuple[ModelConfig, dict, dict]:
  """(model config, params as a pure dict of numpy arrays, the whole config.json).

  Reads the latest checkpoint unless `step` is given, restoring only its "params" item onto the
  first local device. The model config's `norm_impl`, `qkv_impl` and `mlp_impl` come back as
  "xla": those Pallas kernels are GPU training settings, and the jnp forms compute the same
  function (to rounding) anywhere.
  """
  workdir = pathlib.Path(workdir).absolute()
  config = read_config(workdir)
  cfg = ModelConfig.from_dict(dict(config["model"], norm_impl="xla", qkv_impl="xla",
                                   mlp_impl="xla"))
  ckpt_dir = workdir / CHECKPOINTS
  if not ckpt_dir.is_dir():
    raise WorkdirError(f"{workdir} has no {CHECKPOINTS}/ directory; nothing to read.")
  with ocp.CheckpointManager(ckpt_dir) as mngr:
    step = mngr.latest_step() if step is None else step
    if step is None or step not in mngr.all_steps():
      raise WorkdirError(f"{ckpt_dir} holds no checkpoint"
                         f"{'' if step is None else f' for step {step}'}; steps: "
                         f"{sorted(mngr.all_steps())}.")
    device = jax.local_devices()[0]
    target = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype,
                                       sharding=jax.sharding.SingleDeviceSharding(device)),
        abstract_params(cfg))
    restored = mngr.restore(
        step, args=ocp.args.Composite(**{PARAMS_ITEM: ocp.args.StandardRestore(target)}))
  params = jax.tree.map(np.asarray, restored[PARAMS_ITEM])
  return cfg, params, config


def load_model(workdir: str | os.PathLike, step: int | None = None
               ) -> tuple[nnx.Module, dict]:
  """The workdir's model with its checkpointed parameters, and its config.json."""
  cfg, params, config = read_workdir(workdir, step)
  model = models.build(cfg, nnx.Rngs(0))
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, params)
  nnx.update(model, state)
  return model, config
