"""The boundary between the ConfigDict and the library: small frozen dataclasses, validated.

`run_config(config_dict)` is called once by the main; nothing below it sees the ConfigDict. All
checks a user's input can fail happen here (or in `check_workdir_config`), before any device work,
and raise `ConfigError` with one sentence that names the key and the fix.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

from tinystories_jax.parallel.mesh import MeshConfig
from tinystories_jax.training.loss import LOSS_IMPLS, LOSS_KERNELS, VOCAB_MULTIPLE
from tinystories_jax.training.optimizer import SCHEDULES, OptimizerConfig

NONFINITE = ("stop", "skip")
CONFIG_FILE = "config.json"


class ConfigError(ValueError):
  """A run configuration that cannot work; the message says which key and how to fix it."""


@dataclasses.dataclass(frozen=True)
class DataConfig:
  dir: str
  packed: bool = False
  worker_count: int = 0
  worker_buffer_size: int = 2


@dataclasses.dataclass(frozen=True)
class ModelChoice:
  """Which preset to build and how to run it; the vocabulary comes from the data directory."""
  family: str = "llama"
  name: str = "260k"
  attention: str = "auto"
  dtype: str = "float32"
  remat: str = "none"
  scan_layers: bool = False
  norm: str = "xla"
  qkv: str = "xla"
  mlp: str = "xla"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  steps: int = 2000
  batch_size: int = 32
  grad_accum_steps: int = 1
  seq_len: int = 256
  seed: int = 0
  log_every: int = 50
  eval_every: int = 500
  eval_batches: int = 0
  checkpoint_every: int = 500
  keep_checkpoints: int = 3
  async_checkpoints: bool = True
  loss: str = "fused"
  loss_chunk: int = 128
  loss_vocab_multiple: int = VOCAB_MULTIPLE
  loss_kernel: str = "auto"
  z_loss: float = 0.0
  on_nonfinite: str = "stop"
  peak_flops: float = 0.0
  progress_bar: bool = True


@dataclasses.dataclass(frozen=True)
class MeshSetup:
  shape: MeshConfig
  cpu_devices: int = -1
  distributed: bool = False


@dataclasses.dataclass(frozen=True)
class RunConfig:
  data: DataConfig
  model: ModelChoice
  train: TrainConfig
  optimizer: OptimizerConfig
  mesh: MeshSetup
  raw: Mapping[str, Any]  # the ConfigDict as plain JSON-able dicts, for config.json


def _section(cls, d: Mapping[str, Any], name: str):
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(d) - names)
  if unknown:
    raise ConfigError(f"Unknown config key(s) {', '.join(f'{name}.{k}' for k in unknown)}; "
                      f"valid keys in {name} are {', '.join(sorted(names))}.")
  return cls(**d)


def run_config(config: Any) -> RunConfig:
  """Converts a ConfigDict (or nested dict) into a validated `RunConfig`.

  Raises:
    ConfigError: a key is unknown or a value is out of range.
  """
  raw = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  raw = json.loads(json.dumps(raw))
  sections = {"data", "model", "train", "optimizer", "mesh"}
  unknown = sorted(set(raw) - sections)
  if unknown:
    raise ConfigError(f"Unknown config section(s) {unknown}; the sections are "
                      f"{sorted(sections)}.")
  missing = sorted(sections - set(raw))
  if missing:
    raise ConfigError(f"The config lacks section(s) {missing}; start config files from "
                      "configs/base.py.")
  mesh_raw = dict(raw["mesh"])
  cpu_devices = mesh_raw.pop("cpu_devices", -1)
  distributed = mesh_raw.pop("distributed", False)
  run = RunConfig(
      data=_section(DataConfig, raw["data"], "data"),
      model=_section(ModelChoice, raw["model"], "model"),
      train=_section(TrainConfig, raw["train"], "train"),
      optimizer=_section(OptimizerConfig, raw["optimizer"], "optimizer"),
      mesh=MeshSetup(_section(MeshConfig, mesh_raw, "mesh"), cpu_devices, distributed),
      raw=raw,
  )
  validate(run)
  return run


def validate(run: RunConfig) -> None:
  """Range checks that need no devices and no data."""
  t, o = run.train, run.optimizer

  def need(ok: bool, msg: str):
    if not ok:
      raise ConfigError(msg)

  for key in ("steps", "batch_size", "grad_accum_steps", "seq_len", "log_every",
              "checkpoint_every", "keep_checkpoints", "loss_chunk", "loss_vocab_multiple"):
    need(getattr(t, key) > 0, f"train.{key} must be a positive integer, got {getattr(t, key)}.")
  for key in ("eval_every", "eval_batches"):
    need(getattr(t, key) >= 0, f"train.{key} must be >= 0 (0 means "
         f"{'only at the end' if key == 'eval_every' else 'the whole split'}), got "
         f"{getattr(t, key)}.")
  need(t.loss in LOSS_IMPLS, f"train.loss={t.loss!r} is not one of {LOSS_IMPLS}.")
  need(t.loss_kernel in LOSS_KERNELS,
       f"train.loss_kernel={t.loss_kernel!r} is not one of {LOSS_KERNELS}.")
  need(t.loss_kernel in ("auto", "xla") or t.loss == "fused",
       f"train.loss_kernel={t.loss_kernel!r} applies to train.loss='fused', not {t.loss!r}.")
  need(t.on_nonfinite in NONFINITE,
       f"train.on_nonfinite={t.on_nonfinite!r} is not one of {NONFINITE}.")
  need(t.z_loss >= 0, f"train.z_loss must be >= 0, got {t.z_loss}.")
  need(o.schedule in SCHEDULES, f"optimizer.schedule={o.schedule!r} is not one of {SCHEDULES}.")
  need(o.lr > 0, f"optimizer.lr must be positive, got {o.lr}.")
  need(o.warmup_steps >= 0, f"optimizer.warmup_steps must be >= 0, got {o.warmup_steps}.")
  need(0 <= o.b1 < 1 and 0 <= o.b2 < 1, "optimizer.b1 and optimizer.b2 must lie in [0, 1).")
  need(o.weight_decay >= 0 and o.clip_norm >= 0,
       "optimizer.weight_decay and optimizer.clip_norm must be >= 0.")
  need(o.flatten_below >= 0, "optimizer.flatten_below must be >= 0 (0: no parameter "
       f"flattened), got {o.flatten_below}.")
  need(run.mesh.cpu_devices >= -1, "mesh.cpu_devices must be -1 (one device per core), 0 (one "
       f"device) or a device count, got {run.mesh.cpu_devices}.")
  need(bool(run.data.dir), "data.dir is empty; set --config.data.dir to a directory written by "
       "`python -m tinystories_jax.prepare`.")


def check_batch_fits(run: RunConfig, batch_divisor: int, process_count: int) -> None:
  """The batch must split evenly over the mesh's batch axes and over the hosts."""
  b = run.train.batch_size
  if b % batch_divisor:
    raise ConfigError(
        f"train.batch_size={b} does not divide over the mesh's data axes (mesh.data x mesh.fsdp "
        f"= {batch_divisor}); use a multiple of {batch_divisor}.")
  if b % process_count:
    raise ConfigError(f"train.batch_size={b} does not divide over {process_count} hosts; use a "
                      f"multiple of {process_count}.")


# Keys that may change when a run is resumed: how it is run, not what it computes.
RESUMABLE = {
    "data": {"dir", "worker_count", "worker_buffer_size"},
    "model_preset": {"attention", "dtype", "remat", "scan_layers", "norm", "qkv", "mlp"},
    # init_std only shapes a fresh initialisation; an imported model may record another.
    "model": {"attention_impl", "dtype", "remat", "scan_layers", "norm_impl", "qkv_impl",
              "mlp_impl", "init_std"},
    "train": {"steps", "log_every", "eval_every", "eval_batches", "checkpoint_every",
              "keep_checkpoints", "async_checkpoints", "loss", "loss_chunk", "loss_vocab_multiple",
              "loss_kernel", "loss_online_lse",  # the latter: in older workdirs
              "on_nonfinite",
              "peak_flops", "progress_bar"},
    "optimizer": set(),
    "mesh": {"data", "fsdp", "tensor", "cpu_devices", "distributed"},
}
# Keys that workdirs written before them lack, with the value those runs had.
ADDED_SINCE = {"optimizer": {"flatten_below": 0}}


def workdir_config(run: RunConfig, model_dict: Mapping[str, Any]) -> dict[str, Any]:
  """The JSON written to WORKDIR/config.json.

  `model` is the resolved `ModelConfig.to_dict()` (what `sample`, `serve` and `interop` rebuild
  the network from); `model_preset` is the config's model section that produced it.
  """
  out = {k: v for k, v in run.raw.items() if k != "model"}
  out["model"] = dict(model_dict)
  out["model_preset"] = run.raw["model"]
  return out


def check_workdir_config(saved: Mapping[str, Any], new: Mapping[str, Any], workdir: str) -> None:
  """Refuses to resume a workdir whose recorded run differs in anything but how it is run.

  A workdir written by `interop import-*` records only the model; then only the model is compared.
  """
  sections = ["model"] if "train" not in saved else sorted(set(saved) | set(new))
  diffs = []
  for section in sections:
    a, b = saved.get(section), new.get(section)
    if not isinstance(a, Mapping) or not isinstance(b, Mapping):
      if a != b and section in new:
        diffs.append((section, a, b))
      continue
    older = ADDED_SINCE.get(section, {})
    for key in sorted(set(a) | set(b)):
      if key in RESUMABLE.get(section, set()):
        continue
      was, now = a.get(key, older.get(key)), b.get(key, older.get(key))
      if was != now:
        diffs.append((f"{section}.{key}", was, now))
  if diffs:
    shown = "; ".join(f"{k} was {a!r}, now {b!r}" for k, a, b in diffs[:4])
    more = f" (and {len(diffs) - 4} more)" if len(diffs) > 4 else ""
    raise ConfigError(
        f"The workdir {workdir} holds a run with a different configuration ({shown}{more}); "
        "pass the same values to resume it, or use a new --workdir.")


def read_workdir_config(workdir: str) -> dict[str, Any] | None:
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ConfigError(f"{path} is unreadable ({e}); repair or remove it, or use a new "
                      "--workdir.") from e
