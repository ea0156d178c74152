"""The training loop: resume or start, step, log, evaluate, checkpoint, stop cleanly.

`train(run, workdir)` is the one function `python -m tinystories_jax.train` calls. Everything that
can fail because of the user's input (data directory, mesh, batch, a workdir from another run) is
checked before the first compilation and raised as `ConfigError` / `DataError`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import threading
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from absl import logging

from tinystories_jax.data import pipeline
from tinystories_jax.models import presets
from tinystories_jax.models.config import MLP_IMPLS, NORM_IMPLS, QKV_IMPLS, ModelConfig
from tinystories_jax.models.config import count_flops_per_token
from tinystories_jax.parallel import mesh as mesh_lib
from tinystories_jax.parallel import distributed, placement, rules
from tinystories_jax.training import checkpoint as ckpt_lib
from tinystories_jax.training import evaluate as eval_lib
from tinystories_jax.training import loss as loss_lib
from tinystories_jax.training import metrics as metrics_lib
from tinystories_jax.training import optimizer as opt_lib
from tinystories_jax.training import state as state_lib
from tinystories_jax.training import step as step_lib
from tinystories_jax.training.config import (CONFIG_FILE, ConfigError, RunConfig,
                                             check_batch_fits, check_workdir_config,
                                             read_workdir_config, workdir_config)


class TrainingDiverged(RuntimeError):
  """The loss became NaN or Inf and the run was configured to stop."""


def setup_runtime(run: RunConfig, dist: distributed.DistributedOptions | None = None) -> None:
  """Settings that must precede JAX's backend start (fake CPU devices, multi-host init).

  Joins a multi-process job when `dist`, the cluster's environment or `mesh.distributed` says
  there is one (see `parallel.distributed`); a no-op on one process.
  """
  dist = dist or distributed.DistributedOptions()
  single_process = distributed.plan(dataclasses.replace(
      dist, force=dist.force or run.mesh.distributed)).source is None
  count = cpu_device_count(run, single_process=single_process)
  if count:
    try:
      jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError:
      if run.mesh.cpu_devices > 0:  # asked for explicitly: say why it cannot happen
        raise
      logging.info("JAX already started; keeping its %d CPU device(s).", jax.device_count("cpu"))
  distributed.initialize(dataclasses.replace(dist, force=dist.force or run.mesh.distributed))


def cpu_device_count(run: RunConfig, *, single_process: bool = True,
                     env: Mapping[str, str] | None = None) -> int:
  """How many CPU devices to ask JAX for; 0 leaves its default (one).

  `mesh.cpu_devices` > 0 is taken as given. -1 ("auto", the default) splits the CPU of a
  single-process run into one device per core this process may use, reduced to the largest count
  that divides `train.batch_size`, when the mesh is the default one (data = -1, fsdp = tensor = 1)
  and `XLA_FLAGS` does not already fix the count: XLA:CPU runs most of one step's ops on one
  core, and data parallelism over the 2 cores of the development machine made the llama 260k
  step 1.16-1.26x faster (docs/training.md). On a GPU or TPU host the CPU devices go unused.
  """
  env = os.environ if env is None else env
  if run.mesh.cpu_devices >= 0:
    return run.mesh.cpu_devices
  if (not single_process or run.mesh.shape.sizes() != (-1, 1, 1)
      or "xla_force_host_platform_device_count" in env.get("XLA_FLAGS", "")):
    return 0
  try:
    cores = len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    cores = os.cpu_count() or 1
  count = max(n for n in range(1, cores + 1) if run.train.batch_size % n == 0)
  return count if count > 1 else 0


def _check_stacked_qkv(cfg: ModelConfig) -> None:
  """model.qkv='pallas' runs inside the Pallas attention kernels: they must be the ones chosen."""
  from tinystories_jax.kernels import flash_attention as fa  # pylint: disable=g-import-not-at-top
  from tinystories_jax.models import attention as attn  # pylint: disable=g-import-not-at-top
  platform = "gpu" if fa.interpret_forced() else jax.default_backend()
  if platform != "gpu":
    raise ConfigError(f"model.qkv='pallas' runs in the GPU attention kernels, and this machine "
                      f"is {platform!r}; use model.qkv='xla'.")
  impl = cfg.attention_impl
  if impl == "auto":
    impl = attn.choose_auto(cfg.dtype, cfg.head_dim, None, backend=platform)
  if impl != "pallas":
    raise ConfigError(f"model.qkv='pallas' runs in the Pallas attention kernels, but "
                      f"model.attention={cfg.attention_impl!r} runs {impl!r} for this model; "
                      "set model.attention='pallas' or model.qkv='xla'.")


def resolve_model(run: RunConfig, vocab_size: int) -> ModelConfig:
  """The preset named by `model.family` / `model.name`, sized to the data's vocabulary."""
  m = run.model
  makers = {"llama": presets.llama, "gpt_neo": presets.gpt_neo}
  if m.norm not in NORM_IMPLS:
    raise ConfigError(f"model.norm={m.norm!r} is not one of {NORM_IMPLS}.")
  if m.qkv not in QKV_IMPLS:
    raise ConfigError(f"model.qkv={m.qkv!r} is not one of {QKV_IMPLS}.")
  if m.mlp not in MLP_IMPLS:
    raise ConfigError(f"model.mlp={m.mlp!r} is not one of {MLP_IMPLS}.")
  if m.family not in makers:
    raise ConfigError(f"model.family={m.family!r} is not one of {sorted(makers)}.")
  try:
    cfg = makers[m.family](m.name, vocab_size=vocab_size)
    cfg = ModelConfig.from_dict(dict(cfg.to_dict(), attention_impl=m.attention, dtype=m.dtype,
                                     remat=m.remat, scan_layers=m.scan_layers,
                                     norm_impl=m.norm, qkv_impl=m.qkv,
                                     mlp_impl=m.mlp))
  except (KeyError, ValueError) as e:
    msg = str(e).strip("'\"")
    raise ConfigError(f"model.family={m.family!r} model.name={m.name!r}: {msg}") from e
  from tinystories_jax.models import attention as attn  # pylint: disable=g-import-not-at-top
  if m.attention not in attn.implementations():
    raise ConfigError(f"model.attention={m.attention!r} is not one of "
                      f"{attn.implementations()}.")
  why = attn.unsupported_reason(m.attention, cfg.dtype, cfg.head_dim)
  if why:
    raise ConfigError(f"model.attention={m.attention!r} cannot run this model here: {why}")
  if cfg.norm_impl == "pallas":
    from tinystories_jax.kernels import flash_attention as fa  # pylint: disable=g-import-not-at-top
    from tinystories_jax.kernels import rms_norm  # pylint: disable=g-import-not-at-top
    _, why = rms_norm.supports(cfg.d_model,
                               "gpu" if fa.interpret_forced() else jax.default_backend())
    if why:
      raise ConfigError(f"model.norm='pallas' cannot run here: {why}")
  if cfg.qkv_impl == "pallas":
    _check_stacked_qkv(cfg)
  if cfg.mlp_impl == "pallas":
    from tinystories_jax.kernels import flash_attention as fa  # pylint: disable=g-import-not-at-top
    from tinystories_jax.kernels import swiglu  # pylint: disable=g-import-not-at-top
    _, why = swiglu.supports("gpu" if fa.interpret_forced() else jax.default_backend())
    if why:
      raise ConfigError(f"model.mlp='pallas' cannot run here: {why}")
  if run.train.loss_kernel in ("pallas", "pallas_fwd_grad"):
    from tinystories_jax.kernels import cross_entropy  # pylint: disable=g-import-not-at-top
    from tinystories_jax.training.loss import padded_vocab  # pylint: disable=g-import-not-at-top
    _, why = cross_entropy.supports(
        padded_vocab(cfg.vocab_size, run.train.loss_vocab_multiple), jax.default_backend())
    if why:
      raise ConfigError(f"train.loss_kernel={run.train.loss_kernel!r} cannot run here: {why}")
  if cfg.max_positions < run.train.seq_len:
    raise ConfigError(f"train.seq_len={run.train.seq_len} exceeds the model's "
                      f"{cfg.max_positions} positions; lower train.seq_len.")
  return cfg


class _Preemption:
  """Turns SIGTERM into a flag the loop polls, so a preempted VM saves before it exits."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def should_stop(self) -> bool:
    if jax.process_count() == 1:
      return self.requested
    # Every host must agree, or some would wait forever in the next collective.
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return bool(np.any(multihost_utils.process_allgather(np.array(self.requested))))


@dataclasses.dataclass
class _Run:
  """The pieces `train` assembles before the first step."""
  run: RunConfig
  workdir: str
  data: pipeline.PreparedData
  model_cfg: ModelConfig
  mesh: jax.sharding.Mesh
  config_json: dict


def prepare_run(run: RunConfig, workdir: str) -> _Run:
  """All checks of the user's input, in order, before any compilation.

  Raises:
    ConfigError, DataError: with a one-sentence message saying what to change.
  """
  data = pipeline.PreparedData.load(run.data.dir)
  data.split("train")
  data.split("valid")
  model_cfg = resolve_model(run, data.vocab_size)
  try:
    mesh = mesh_lib.make_mesh(run.mesh.shape)
  except mesh_lib.MeshError as e:
    raise ConfigError(str(e)) from e
  check_batch_fits(run, mesh_lib.batch_divisor(mesh), jax.process_count())
  config_json = workdir_config(run, model_cfg.to_dict())
  saved = read_workdir_config(workdir)
  if saved is not None:
    check_workdir_config(saved, config_json, workdir)
  check_same_tokenizer(workdir, data)
  return _Run(run, workdir, data, model_cfg, mesh, config_json)


def check_same_tokenizer(workdir: str, data: pipeline.PreparedData) -> None:
  """Refuses data tokenized otherwise than the run in `workdir` was (data.dir may change on a
  resume, e.g. to a copy on another disk, but not to another tokenizer's token ids).

  Raises:
    ConfigError: the workdir's tokenizer.model and the data's differ in their pieces or ids.
  """
  from tinystories_jax.data.errors import DataError  # pylint: disable=g-import-not-at-top
  from tinystories_jax.data.tokenizer import Tokenizer  # pylint: disable=g-import-not-at-top
  saved = os.path.join(workdir, "tokenizer.model")
  if not os.path.isfile(saved) or not data.tokenizer_path.is_file():
    return
  try:
    a = Tokenizer(saved)
  except DataError:  # not a SentencePiece model (an imported tokenizer of another kind)
    return
  if a.same_as(Tokenizer(data.tokenizer_path)):
    return
  raise ConfigError(
      f"data.dir={data.dir} was tokenized with another tokenizer than this run's "
      f"({saved}); resume on data prepared with `prepare --tokenizer={saved}`, or train into a "
      "new workdir.")


def _write_workdir_files(r: _Run) -> None:
  if jax.process_index() != 0:
    return
  os.makedirs(r.workdir, exist_ok=True)
  path = os.path.join(r.workdir, CONFIG_FILE)
  with open(path + ".tmp", "w") as f:
    json.dump(r.config_json, f, indent=2, sort_keys=True)
  os.replace(path + ".tmp", path)
  tok = os.path.join(r.workdir, "tokenizer.model")
  if r.data.tokenizer_path.is_file():
    shutil.copyfile(r.data.tokenizer_path, tok)


def train(run: RunConfig, workdir: str) -> dict[str, Any]:
  """Trains (or resumes) the run in `workdir` up to `train.steps`.

  Returns:
    The last metrics row written (also the last line of WORKDIR/metrics.jsonl).
  """
  metrics_lib.quiet_library_logs()
  r = prepare_run(run, workdir)
  t = run.train
  _write_workdir_files(r)
  mesh, model_cfg = r.mesh, r.model_cfg
  nproc = jax.process_count()
  accum = t.grad_accum_steps
  layout = state_lib.model_layout(model_cfg)
  tx = opt_lib.make_optimizer(run.optimizer, t.steps, layout.logical_names,
                              layout.abstract_params)
  schedule = opt_lib.learning_rate(run.optimizer, t.steps)
  try:
    shardings = state_lib.state_shardings(layout, tx, mesh)
  except opt_lib.FlattenedSplitError as e:
    raise ConfigError(str(e)) from e
  abstract = state_lib.abstract_state(layout, tx, shardings)
  loss_kernel = t.loss_kernel
  if t.loss == "fused":
    loss_kernel = loss_lib.resolve_kernel_for_mesh(t.loss_kernel, model_cfg.vocab_size,
                                                   t.loss_vocab_multiple, mesh)
    logging.info("Output loss: fused, its passes over the logits by %s (train.loss_kernel=%r).",
                 loss_kernel, t.loss_kernel)
  step_cfg = step_lib.StepConfig(loss_impl=t.loss, loss_chunk=t.loss_chunk,
                                 loss_vocab_multiple=t.loss_vocab_multiple,
                                 loss_kernel=loss_kernel, z_loss=t.z_loss,
                                 grad_accum_steps=accum,
                                 skip_nonfinite=t.on_nonfinite == "skip")
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                       keep=t.keep_checkpoints, async_save=t.async_checkpoints)
  restored = checkpointer.restore_latest(abstract.params, abstract.opt_state)
  rng_data = np.asarray(jax.random.key_data(jax.random.key(t.seed))).tolist()
  data_state = None
  if restored is None:
    state, extra = state_lib.init_state(model_cfg, tx, shardings, t.seed)
    logging.info("Initialised %s (%s parameters) on mesh %s.", run.model.name,
                 f"{layout.num_params:,}", dict(mesh.shape))
  else:
    extra = state_lib.init_extra(model_cfg, shardings)
    if restored.opt_state is None:
      # An imported workdir: parameters only, so the optimizer starts fresh at step 0.
      opt_state = jax.jit(tx.init, out_shardings=shardings.state.opt_state)(restored.params)
      state = step_lib.TrainState(jax.device_put(np.int32(0), shardings.state.step),
                                  restored.params, opt_state)
      logging.info("Continuing from imported parameters (checkpoint step %d) with a fresh "
                   "optimizer.", restored.step)
    else:
      state = step_lib.TrainState(
          jax.device_put(np.int32(restored.meta["step"]), shardings.state.step),
          restored.params, restored.opt_state)
      data_state = restored.data_iter
      rng_data = restored.meta.get("rng", rng_data)
      logging.info("Resumed from step %d in %s.", restored.step, checkpointer.directory)
  start = int(state.step)
  if start >= t.steps:
    logging.info("The run in %s already reached step %d (train.steps=%d); nothing to do.",
                 workdir, start, t.steps)
    checkpointer.close()
    return {"step": start}

  local_batch = t.batch_size * accum // nproc
  dataset = pipeline.train_dataset(run.data.dir, batch_size=local_batch, seq_len=t.seq_len,
                                   seed=t.seed, packed=run.data.packed)
  data_iter = pipeline.make_iterator(dataset, worker_count=run.data.worker_count,
                                     worker_buffer_size=run.data.worker_buffer_size)
  if data_state is not None:
    data_iter.set_state(data_state)

  def batch_shardings(batch):
    return {k: rules.batch_sharding(mesh, np.ndim(v)) for k, v in batch.items()}

  first = next(data_iter)
  train_step = step_lib.jit_train_step(
      step_lib.make_train_step(layout.graphdef, tx, schedule, step_cfg), shardings.state,
      shardings.extra, batch_shardings(first), mesh)
  eval_step = None
  valid_info = r.data.split("valid")
  eval_batch = t.batch_size // nproc
  tokens_per_step = t.batch_size * accum * t.seq_len
  flops_per_token = count_flops_per_token(model_cfg, t.seq_len)
  peak = metrics_lib.peak_flops_per_device(override=t.peak_flops)
  writer = metrics_lib.MetricWriter(workdir)
  progress = metrics_lib.Progress(t.steps, start, t.progress_bar)
  meta = {"rng": rng_data, "config": r.config_json}
  last_saved = restored.step if restored is not None and restored.opt_state is not None else None
  pending: list[dict] = []
  row: dict[str, Any] = {"step": start}
  skipped = 0

  def run_eval(step: int) -> dict[str, float]:
    nonlocal eval_step
    if eval_step is None:
      probe = next(pipeline.eval_batches(run.data.dir, batch_size=eval_batch, seq_len=t.seq_len,
                                         max_batches=1))
      eval_step = step_lib.jit_eval_step(step_lib.make_eval_step(layout.graphdef, step_cfg),
                                         shardings.params, shardings.extra,
                                         batch_shardings(probe), mesh)
    out = eval_lib.evaluate(eval_step, state.params, extra, mesh, data_dir=run.data.dir,
                            split_info=valid_info, batch_size=eval_batch, seq_len=t.seq_len,
                            max_batches=t.eval_batches or None)
    logging.info("step %d: eval_loss=%.4f eval_bpb=%.4f", step, out["eval_loss"],
                 out["eval_bpb"])
    return out

  def drain(step: int) -> list[dict]:
    """Fetches the metrics of the steps since the last drain; stops on a non-finite loss."""
    nonlocal skipped
    host = jax.device_get(pending)
    pending.clear()
    bad = [m for m in host if not bool(m["finite"])]
    if bad and t.on_nonfinite == "stop":
      checkpointer.close()
      good = f"step {last_saved}" if last_saved is not None else "none was written yet"
      raise TrainingDiverged(
          f"The loss became {float(bad[0]['train_loss'])} by step {step}; stopped with the last "
          f"good checkpoint intact ({good}). Lower optimizer.lr, set optimizer.clip_norm, or "
          "set train.on_nonfinite='skip'.")
    skipped += len(bad)
    return host

  def save(step: int) -> None:
    nonlocal last_saved
    checkpointer.save(step, params=state.params, opt_state=state.opt_state,
                      data_iter=data_iter.get_state(), meta=meta)
    last_saved = step

  batch = first
  interval_start, interval_steps = None, 0
  stopped_early = False
  with _Preemption() as preemption:
    for step in range(start, t.steps):
      if batch is None:
        batch = next(data_iter)
      state, m = train_step(state, extra, placement.place_batch(batch, mesh))
      batch = None
      pending.append(m)
      done = step + 1
      if interval_start is None:
        # The first step compiles; throughput is measured from its end.
        jax.block_until_ready(m)
        interval_start, interval_steps = time.perf_counter(), 0
      else:
        interval_steps += 1
      log_now = done % t.log_every == 0 or done == t.steps
      eval_now = (t.eval_every and done % t.eval_every == 0) or done == t.steps
      save_now = done % t.checkpoint_every == 0 or done == t.steps
      # Across hosts the check is a collective, so it runs only at logging steps there.
      stop_now = (nproc == 1 or done % t.log_every == 0) and preemption.should_stop()
      progress.update(1)
      if not (log_now or eval_now or save_now or stop_now):
        continue
      host = drain(done)
      if log_now or eval_now:
        now = time.perf_counter()
        metrics = {"train_loss": float(np.mean([h["train_loss"] for h in host])),
                   "learning_rate": float(host[-1]["learning_rate"]),
                   "grad_norm": float(host[-1]["grad_norm"])}
        if t.z_loss:
          metrics["z_loss"] = float(host[-1]["z_loss"])
        if interval_steps:
          tok_s = interval_steps * tokens_per_step / (now - interval_start)
          metrics.update(tokens_per_s=tok_s, model_tflops=tok_s * flops_per_token / 1e12)
          if peak:
            metrics["mfu"] = tok_s * flops_per_token / (peak * jax.device_count())
        if skipped:
          metrics["skipped_steps"] = skipped
        if eval_now:
          metrics.update(run_eval(done))
        row = writer.write(done, metrics)
        progress.update(0, loss=metrics["train_loss"])
        interval_start, interval_steps = time.perf_counter(), 0
      if save_now or stop_now:
        save(done)
      if stop_now and done < t.steps:
        logging.warning("SIGTERM received: saved step %d and stopping; rerun the same command "
                        "to resume.", done)
        stopped_early = True
        break
  progress.close()
  writer.close()
  checkpointer.close()
  data_iter.close()  # stops Grain's worker processes (data.worker_count > 0) before exit
  if not stopped_early:
    logging.info("Finished %d steps in %s.", t.steps, workdir)
  return row
