"""Steady-state throughput of the real train step on random tokens.

`measure_train_throughput` is shared by `benchmarks/train_throughput.py` (CPU and GPU) and the GPU
check script. It builds the same jitted step the trainer runs (AdamW, clipping, the configured
loss) on a one-axis data-parallel mesh over all local devices, and times `steps` calls after
`warmup` calls, blocking on the result of each timed window.
"""

from __future__ import annotations

import pathlib
import time
from typing import Any

import jax
import numpy as np

from tinystories_jax.models.config import ModelConfig, count_flops_per_token
from tinystories_jax.parallel import mesh as mesh_lib
from tinystories_jax.parallel import placement, rules
from tinystories_jax.training import loss as loss_lib
from tinystories_jax.training import optimizer as opt_lib
from tinystories_jax.training import state as state_lib
from tinystories_jax.training import step as step_lib


def measure_train_throughput(model_cfg: ModelConfig, *, batch_size: int, seq_len: int,
                             steps: int = 10, warmup: int = 3, loss: str = "fused",
                             loss_chunk: int = 128,
                             loss_vocab_multiple: int = loss_lib.VOCAB_MULTIPLE,
                             loss_kernel: str = "auto",
                             grad_accum_steps: int = 1, flatten_below: int = 0,
                             mesh_config: mesh_lib.MeshConfig | None = None,
                             devices=None, seed: int = 0, trace_dir: str | None = None,
                             trace_steps: int = 3) -> dict[str, Any]:
  """Times the full train step (forward, backward, clip, AdamW) of `model_cfg`.

  Args:
    model_cfg: the model to build.
    batch_size: global sequences per micro-batch.
    seq_len: tokens per sequence.
    steps: timed steps.
    warmup: untimed steps first (the first compiles).
    loss: "fused", "chunked" or "plain" output-layer loss (training/loss.py).
    loss_chunk: positions per chunk of the chunked loss.
    loss_vocab_multiple: rows the fused loss pads the output projection to.
    loss_kernel: what makes the fused loss's passes over its logits (loss.LOSS_KERNELS).
    grad_accum_steps: micro-batches per step.
    flatten_below: `OptimizerConfig.flatten_below` (0: every parameter updated alone).
    mesh_config: mesh sizes (default: all devices on `data`).
    devices: the devices to lay the mesh over (default: all).
    seed: parameter and token seed.
    trace_dir: if set, `trace_steps` more steps run after the timed ones under
      `jax.profiler.trace(trace_dir)` (an XProf trace: per-kernel device times), and the
      step's optimized HLO is written beside it (`step_hlo.txt`).
    trace_steps: steps traced.

  Returns:
    dict with `tokens_per_s`, `step_ms` (mean), `model_tflops` (PaLM count), `params`, `loss`
    (the last timed step's), `compile_s` (the first step, compilation included), `init_s` (the
    parameters' and optimizer state's creation, its compilation included) and the shape.
  """
  mesh = mesh_lib.make_mesh(mesh_config or mesh_lib.MeshConfig(), devices)
  opt_cfg = opt_lib.OptimizerConfig(lr=5e-4, schedule="cosine", warmup_steps=10, clip_norm=1.0,
                                    flatten_below=flatten_below)
  layout = state_lib.model_layout(model_cfg)
  total = warmup + steps
  tx = opt_lib.make_optimizer(opt_cfg, total, layout.logical_names, layout.abstract_params)
  shardings = state_lib.state_shardings(layout, tx, mesh)
  t0 = time.perf_counter()
  state, extra = state_lib.init_state(model_cfg, tx, shardings, seed)
  jax.block_until_ready(state)
  init_s = time.perf_counter() - t0
  if loss == "fused":  # "auto" as the mesh's devices run it
    loss_kernel = loss_lib.resolve_kernel_for_mesh(loss_kernel, model_cfg.vocab_size,
                                                   loss_vocab_multiple, mesh)
  step_cfg = step_lib.StepConfig(loss_impl=loss, loss_chunk=loss_chunk,
                                 loss_vocab_multiple=loss_vocab_multiple,
                                 loss_kernel=loss_kernel,
                                 grad_accum_steps=grad_accum_steps)
  rng = np.random.default_rng(seed)
  rows = batch_size * grad_accum_steps // jax.process_count()

  def make_batch():
    tokens = rng.integers(0, model_cfg.vocab_size, (rows, seq_len + 1), dtype=np.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
            "loss_mask": np.ones((rows, seq_len), np.float32)}

  # A few distinct batches, placed once: the input pipeline is not what is measured here.
  batches = [placement.place_batch(make_batch(), mesh) for _ in range(2)]
  batch_shardings = {k: rules.batch_sharding(mesh, v.ndim) for k, v in batches[0].items()}
  train_step = step_lib.jit_train_step(
      step_lib.make_train_step(layout.graphdef, tx, opt_lib.learning_rate(opt_cfg, total),
                               step_cfg),
      shardings.state, shardings.extra, batch_shardings, mesh)
  t0 = time.perf_counter()
  state, metrics = train_step(state, extra, batches[0])
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - t0
  for i in range(1, warmup):
    state, metrics = train_step(state, extra, batches[i % 2])
  jax.block_until_ready((state, metrics))
  t0 = time.perf_counter()
  for i in range(steps):
    state, metrics = train_step(state, extra, batches[i % 2])
  jax.block_until_ready((state, metrics))
  elapsed = time.perf_counter() - t0
  loss_value = float(metrics["train_loss"])  # the last timed step's, traced or not
  if trace_dir:
    # Past `total` steps the schedule holds its final rate; the trace is not of the timed steps.
    with jax.profiler.trace(trace_dir):
      for i in range(trace_steps):
        state, metrics = train_step(state, extra, batches[i % 2])
      jax.block_until_ready((state, metrics))
    # The optimized HLO beside the trace, so its kernels (named after fusions) can be read.
    hlo = train_step.lower(state, extra, batches[0]).compile().as_text()
    (pathlib.Path(trace_dir) / "step_hlo.txt").write_text(hlo)
  tokens_per_s = steps * batch_size * grad_accum_steps * seq_len / elapsed
  return {
      "tokens_per_s": tokens_per_s,
      "step_ms": 1e3 * elapsed / steps,
      "model_tflops": tokens_per_s * count_flops_per_token(model_cfg, seq_len) / 1e12,
      "params": layout.num_params,
      "loss": loss_value,
      "compile_s": compile_s,
      "init_s": init_s,
      "batch_size": batch_size * grad_accum_steps,
      "seq_len": seq_len,
      "devices": mesh.devices.size,
      "device_kind": jax.devices()[0].device_kind,
  }
