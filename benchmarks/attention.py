"""Attention alone: our Pallas flash kernel beside cuDNN, XLA and jax's stock Pallas kernels.

    python benchmarks/attention.py              # on a GPU: the four shapes of the GPU check
    python benchmarks/attention.py --smoke      # anywhere: tiny shapes, Pallas interpreted

For every (batch, seq, heads, head_dim) shape and mask (causal; causal with a 256-key window) it
times the forward pass and forward + backward (the vjp of all three inputs), each the median of
timed samples after warm-up. A sample is calls issued back to back (about 5 ms of them), blocked
on once at its end (`time_ms`): while the host keeps ahead of the device, the device's time per
call, as a train step spends it, without the host's dispatch of and wait for every call. It
also checks every output, and our gradients, against the float32 reference, so a fast wrong
kernel cannot pass unnoticed.
`backends` times the forward of ours beside jax's stock Pallas Mosaic GPU kernel and cuDNN
(Triton or Mosaic GPU on Hopper). `benchmarks/gpu_check.py` runs `check_features`, `run`,
`backends` and `sweep` as its sections.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import math
import pathlib
import statistics
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from tinystories_jax.kernels import flash_attention as fa  # noqa: E402
from tinystories_jax.kernels.flash_tiling import BlockSizes  # noqa: E402
from tinystories_jax.kernels.flash_tiling import split_head_dim_widths  # noqa: E402
from tinystories_jax.kernels.flash_tiling import visible_pairs  # noqa: E402

# (batch, seq, heads, head_dim): llama2.c 15M-like, long context, TinyStories-33M heads, wide heads.
SHAPES = ((64, 512, 12, 64), (16, 2048, 12, 64), (64, 512, 16, 48), (16, 2048, 8, 128))
SMOKE_SHAPES = ((1, 128, 2, 64), (1, 128, 2, 48))
WINDOWS = {"causal": None, "window256": 256}
SMOKE_WINDOWS = {"causal": None, "window64": 64}
# Tile sizes tried for our kernel in the sweep: (block_q, block_k) of the forward, of dQ and of
# dK/dV (see BlockSizes), then the GPU compiler's warps and stages where they differ from the
# kernels' defaults (4 warps up to head_dim 64; 3 stages forward, 2 backward). The first is the
# default at head_dim <= 64; the second is the same tiles with `fast_exp2` off (each softmax
# exponential by jnp's exp2, as before that option). The last two read the head dim as
# power-of-two column tiles (`split_head_dim`): they run only where the head dim rounded up to
# 16 is not a power of two (48), since elsewhere they are the same kernels as their twins
# without it.
SWEEP = (BlockSizes(128, 64, 64, 64, 64, 64),
         BlockSizes(128, 64, 64, 64, 64, 64, fast_exp2=False),
         BlockSizes(64, 64, 64, 64, 64, 64),
         BlockSizes(128, 128, 64, 64, 64, 64), BlockSizes(128, 64, 128, 32, 32, 128),
         BlockSizes(64, 32, 32, 32, 32, 64), BlockSizes(128, 32, 64, 32, 32, 64),
         BlockSizes(128, 64, 64, 64, 64, 64, num_warps=8),
         BlockSizes(128, 64, 128, 64, 64, 128, num_warps=8),
         BlockSizes(128, 128, 128, 64, 64, 128, num_warps=8),
         BlockSizes(64, 64, 64, 64, 64, 64, num_stages=3),
         BlockSizes(128, 64, 64, 64, 64, 64, num_stages=4),
         BlockSizes(64, 64, 64, 128, 128, 64),
         BlockSizes(128, 64, 64, 64, 64, 64, split_head_dim=True),
         BlockSizes(64, 64, 64, 64, 64, 64, num_stages=3, split_head_dim=True))
# (shape, windows) the sweep visits, in this order: first the attention of the llama train
# shapes (15m at 128x256, 42m at 32x1024; causal only, as llama runs it), then three of SHAPES
# (the first, causal, is where the attention targets compare ours with cuDNN and jax's `mha`).
SWEEP_CASES = (((128, 256, 6, 48), ("causal",)), ((32, 1024, 8, 64), ("causal",)),
               ((64, 512, 12, 64), ("causal",)),
               ((16, 2048, 12, 64), ("causal", "window256")),
               ((64, 512, 16, 48), ("causal", "window256")))


def shape_name(shape) -> str:
  """`BxTxHxD`, the name `--sweep_shapes` picks a sweep case by."""
  return "x".join(str(n) for n in shape)


def sweep_cases(names=()) -> tuple:
  """The SWEEP_CASES whose shape is named in `names` (all of them when it is empty)."""
  known = {shape_name(shape) for shape, _ in SWEEP_CASES}
  unknown = sorted(set(names) - known)
  if unknown:
    raise ValueError(f"no sweep case has shape {', '.join(unknown)}; the cases are "
                     f"{', '.join(shape_name(shape) for shape, _ in SWEEP_CASES)}")
  return tuple(case for case in SWEEP_CASES if not names or shape_name(case[0]) in names)


class Unsupported(Exception):
  """This implementation cannot run this case (recorded, not an error)."""


def _ours(q, k, v, window, *, interpret, block_sizes=None):
  return fa.flash_attention(q, k, v, causal=True, window=window, interpret=interpret,
                            block_sizes=block_sizes)


def _dpa(q, k, v, window, *, implementation):
  return jax.nn.dot_product_attention(
      q, k, v, is_causal=True, implementation=implementation,
      local_window_size=None if window is None else (window - 1, 0))


def _stock_mha(q, k, v, window, *, interpret):
  if window is not None:
    raise Unsupported("jax's stock Pallas mha has no sliding window")
  from jax.experimental.pallas.ops.gpu import attention as stock  # noqa: PLC0415
  params = inspect.signature(stock.mha).parameters
  kwargs = {"causal": True, "interpret": interpret}
  kwargs["sm_scale" if "sm_scale" in params else "scale"] = 1.0 / math.sqrt(q.shape[-1])
  if "segment_ids" in params:
    kwargs["segment_ids"] = None
  return stock.mha(q, k, v, **kwargs)


def _stock_mgpu(q, k, v, window, *, causal=True):
  """jax's stock Mosaic GPU (Hopper) kernel: forward only, causal or not, D % 64 == 0."""
  if window is not None:
    raise Unsupported("jax's stock Mosaic GPU attention has no sliding window")
  if q.shape[-1] % 64:
    raise Unsupported("jax's stock Mosaic GPU attention needs head_dim % 64 == 0")
  from jax.experimental.pallas.ops.gpu import attention_mgpu as mgpu  # noqa: PLC0415
  config = mgpu.TuningConfig(block_q=64, block_kv=128, max_concurrent_steps=2, causal=causal)
  # `run` hands it inputs already made by `_stock_mgpu_inputs` (outside the timed call), so q, k
  # and v arrive in float16 with q pre-scaled: its forward takes no scale, and in jax 0.11.2 it
  # rejects bfloat16 ("src had type bfloat16 and dst had type float16"; H200, 2026-11-26).
  try:
    return mgpu.attention(q, k, v, config)
  except ValueError as e:  # its causal form on CUDA runtimes it knows to miscompile for
    if "not supported with cuda versions" in str(e):
      raise Unsupported(str(e)) from e
    raise


def _stock_mgpu_inputs(q, k, v):
  """float16 q (pre-scaled by 1/sqrt(D)), k, v for `_stock_mgpu`: the same bytes through the
  same tensor-core path as bfloat16, converted once rather than inside every timed call."""
  return [x.astype(jnp.float16) for x in ((q * (q.shape[-1]**-0.5)), k, v)]


# Per-implementation input conversion done once, outside the timed calls.
PREPARE_INPUTS = {"stock_mosaic_gpu": _stock_mgpu_inputs}


def implementations(interpret: bool, on_gpu: bool) -> dict[str, tuple[Callable, bool]]:
  """name -> (fn(q, k, v, window), has_backward)."""
  impls = {
      "pallas": (functools.partial(_ours, interpret=interpret), True),
      "xla": (functools.partial(_dpa, implementation="xla"), True),
      "stock_pallas_mha": (functools.partial(_stock_mha, interpret=interpret), True),
  }
  if on_gpu:
    impls["cudnn"] = (functools.partial(_dpa, implementation="cudnn"), True)
    impls["stock_mosaic_gpu"] = (_stock_mgpu, False)
  return impls


# A timed sample issues calls back to back for about this long, then blocks once.
SAMPLE_MS = 5.0
MAX_CALLS = 100


def calls_per_sample(fn: Callable, *args, warmup: int = 3, sample_ms: float = SAMPLE_MS) -> int:
  """Compiles and warms up `fn` (blocking on each call), then returns how many calls issued
  back to back take about `sample_ms`, from the warm-up calls' median (1 to MAX_CALLS)."""
  jax.block_until_ready(fn(*args))  # compile
  times = []
  for _ in range(max(1, warmup)):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  one_ms = 1e3 * statistics.median(times)
  return max(1, min(MAX_CALLS, math.ceil(sample_ms / max(one_ms, 1e-6))))


def sample_ms(fn: Callable, args, calls: int, issue_ms: list | None = None) -> float:
  """Milliseconds per call of `calls` calls issued back to back, blocking once on the last.

  `issue_ms`, if given, gets the host's time to issue the first of them (the runtime may make
  later ones wait for a free slot, which is not the host's cost): when it is close to the
  returned figure, the host, not the device, set the pace."""
  t0 = time.perf_counter()
  out = fn(*args)
  first = time.perf_counter()
  for _ in range(calls - 1):
    out = fn(*args)
  jax.block_until_ready(out)
  if issue_ms is not None:
    issue_ms.append(1e3 * (first - t0))
  return 1e3 * (time.perf_counter() - t0) / calls


def time_ms(fn: Callable, *args, warmup: int = 3, iters: int = 20, back_to_back: bool = True,
            stats: dict | None = None) -> float:
  """Median time of one call in milliseconds over `iters` timed samples, after warm-up.

  back_to_back (the default): each sample issues `calls_per_sample` calls without waiting and
  blocks once on the last, so the device runs them one after another, as a train step runs its
  kernels, and the host's dispatch of each call and its wait for the result stay out of the
  figure while the host keeps ahead of the device (for calls as short as one dispatch, the
  figure is the host's time per call instead). Otherwise each sample is one call, blocked on
  (how the matmul ceiling is measured).

  `stats`, if given, gets `calls` (per sample) and `issue_ms` (the median of the host's time
  to issue one call; near the result, the host was the limit).
  """
  calls = calls_per_sample(fn, *args, warmup=warmup) if back_to_back else 1
  if not back_to_back:
    for _ in range(1 + warmup):  # compile, warm up
      jax.block_until_ready(fn(*args))
  issue: list[float] = []
  ms = statistics.median(sample_ms(fn, args, calls, issue) for _ in range(iters))
  if stats is not None:
    stats.update(calls=calls, issue_ms=statistics.median(issue))
  return ms


# A figure is the host's pace where issuing one call took the host this share of it or more.
HOST_BOUND = 0.9


def ms_text(row: dict, key: str) -> str:
  """`row[key]` in ms to three places, with ` (host)` where issuing one call took the host
  HOST_BOUND of that time or more (then it bounds the device's time from above)."""
  issue = row.get("issue_ms" if key == "ms" else key[:-len("ms")] + "issue_ms")
  host = issue is not None and issue >= HOST_BOUND * row[key]
  return f"{row[key]:.3f}{' (host)' if host else ''}"


def timed(row: dict, key: str, fn: Callable, *args, iters: int) -> float:
  """`row[key + "_ms"] = time_ms(...)`, with the calls per sample and one call's issue time
  beside it."""
  stats: dict = {}
  row[f"{key}_ms"] = time_ms(fn, *args, iters=iters, stats=stats)
  row[f"{key}_calls"], row[f"{key}_issue_ms"] = stats["calls"], stats["issue_ms"]
  return row[f"{key}_ms"]


def _rel_err(x, ref) -> float:
  x, ref = np.asarray(x, np.float32), np.asarray(ref, np.float32)
  return float(np.abs(x - ref).max() / max(float(np.abs(ref).max()), 1e-6))


def _inputs(shape, dtype, seed):
  b, t, h, d = shape
  keys = jax.random.split(jax.random.key(seed), 4)
  return [jax.random.normal(key, (b, t, h, d), jnp.float32).astype(dtype) for key in keys]


def _flops(shape, window) -> tuple[float, float]:
  """Useful FLOPs (visible pairs only) of the forward and of forward + backward."""
  b, t, h, d = shape
  fwd = 4.0 * b * h * d * visible_pairs(t, t, causal=True, window=window)
  return fwd, 3.5 * fwd  # the backward does 2.5x the forward's matmul work


def _fwd_bwd(fn):
  def run(q, k, v, do):
    o, vjp = jax.vjp(fn, q, k, v)
    return o, vjp(do)
  return run


def run(*, smoke: bool, interpret: bool, emit: Callable[[dict], None], iters: int = 20,
        dtype=jnp.bfloat16, deadline: float | None = None) -> list[dict]:
  """Benchmarks every implementation on every shape and mask; returns the rows it emitted."""
  on_gpu = jax.default_backend() == "gpu"
  impls = implementations(interpret, on_gpu)
  rows = []
  shapes, windows = (SMOKE_SHAPES, SMOKE_WINDOWS) if smoke else (SHAPES, WINDOWS)
  for shape in shapes:
    for mask, window in windows.items():
      q, k, v, do = _inputs(shape, dtype, seed=len(rows))
      ref = []  # the float32 reference, computed for the first row that runs (not past the budget)

      def reference(window=window, q=q, k=k, v=v, do=do, ref=ref):
        if not ref:
          f32 = [x.astype(jnp.float32) for x in (q, k, v, do)]
          ref_fn = functools.partial(fa.flash_attention_reference, causal=True, window=window)
          ref.extend(jax.jit(_fwd_bwd(ref_fn))(*f32))
        return ref
      fwd_flops, fwdbwd_flops = _flops(shape, window)
      for name, (impl, has_bwd) in impls.items():
        b, t, h, d = shape
        row = {"kind": "attention", "impl": name, "B": b, "T": t, "H": h, "D": d, "mask": mask,
               "dtype": jnp.dtype(dtype).name}
        if deadline is not None and time.time() > deadline:
          row["skipped"] = "time budget spent"
          rows.append(row)
          emit(row)
          continue
        fn = functools.partial(impl, window=window)
        try:
          ref_o, ref_grads = reference()
          fwd = jax.jit(lambda q, k, v, fn=fn: fn(q, k, v))
          inputs = PREPARE_INPUTS.get(name, lambda *x: x)(q, k, v)
          row["rel_err"] = _rel_err(fwd(*inputs).astype(jnp.float32), ref_o)
          row["fwd_tflops"] = fwd_flops / timed(row, "fwd", fwd, *inputs, iters=iters) / 1e9
          if has_bwd:
            fwd_bwd = jax.jit(_fwd_bwd(fn))
            if name == "pallas":
              _, grads = fwd_bwd(q, k, v, do)
              row["grad_rel_err"] = max(_rel_err(g, r) for g, r in zip(grads, ref_grads))
            row["fwdbwd_tflops"] = fwdbwd_flops / timed(row, "fwdbwd", fwd_bwd, q, k, v, do,
                                                        iters=iters) / 1e9
        except Unsupported as e:
          row["skipped"] = str(e)
        except Exception as e:  # noqa: BLE001 - one failing implementation must not end the run
          row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        rows.append(row)
        emit(row)
  return rows


# Triton or Mosaic GPU on Hopper: the forward pass (the only pass jax's stock Mosaic GPU kernel
# has) at the head_dim-64 shapes, with and without a causal mask. Its causal form refuses CUDA
# runtime versions 12080 to 12090 (a ptxas miscompilation, jax 0.11.2; the runtime of the
# jax[cuda12]==0.11.2 pip wheels reports 12090), so the unmasked rows always run.
BACKEND_SHAPES = ((64, 512, 12, 64), (32, 1024, 8, 64))
SMOKE_BACKEND_SHAPES = ((1, 128, 2, 64),)


def backends(*, smoke: bool, interpret: bool, emit: Callable[[dict], None], iters: int = 20,
             deadline: float | None = None) -> list[dict]:
  """Forward passes of our kernel (Pallas on Triton), jax's stock Pallas Mosaic GPU kernel and
  cuDNN, bf16 in (the Mosaic GPU kernel takes float16, converted outside the timed calls),
  unmasked and causal; every output checked against the float32 reference."""
  on_gpu = jax.default_backend() == "gpu"
  impls = {"pallas (Triton)": lambda q, k, v, causal: fa.flash_attention(
      q, k, v, causal=causal, interpret=interpret)}
  if on_gpu:
    impls["stock Mosaic GPU"] = lambda q, k, v, causal: _stock_mgpu(q, k, v, None, causal=causal)
    impls["cudnn"] = lambda q, k, v, causal: jax.nn.dot_product_attention(
        q, k, v, is_causal=causal, implementation="cudnn")
  rows = []
  for shape in SMOKE_BACKEND_SHAPES if smoke else BACKEND_SHAPES:
    q, k, v, _ = _inputs(shape, jnp.bfloat16, seed=11)
    for causal in (False, True):
      ref = []  # the float32 reference, computed for the first row that runs

      def reference(causal=causal, q=q, k=k, v=v, ref=ref):
        if not ref:
          f32 = [x.astype(jnp.float32) for x in (q, k, v)]
          ref.append(jax.jit(functools.partial(fa.flash_attention_reference,
                                               causal=causal))(*f32))
        return ref[0]
      b, t, h, d = shape
      flops = 4.0 * b * h * d * visible_pairs(t, t, causal=causal, window=None)
      for name, impl in impls.items():
        row = {"kind": "attention_backend", "impl": name, "B": b, "T": t, "H": h, "D": d,
               "causal": causal}
        if deadline is not None and time.time() > deadline:
          rows.append({**row, "skipped": "time budget spent"})
          emit(rows[-1])
          continue
        try:
          fwd = jax.jit(functools.partial(impl, causal=causal))
          inputs = (_stock_mgpu_inputs(q, k, v) if name == "stock Mosaic GPU" else (q, k, v))
          row["rel_err"] = _rel_err(fwd(*inputs).astype(jnp.float32), reference())
          row["fwd_tflops"] = flops / timed(row, "fwd", fwd, *inputs, iters=iters) / 1e9
        except Unsupported as e:
          row["skipped"] = str(e)
        except Exception as e:  # noqa: BLE001 - one failing implementation must not end the run
          row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        rows.append(row)
        emit(row)
  return rows


def backends_table(rows: list[dict]) -> str:
  """Markdown table of the backend rows, with each one's time relative to ours."""
  out = ["| shape | mask | impl | fwd ms | fwd TFLOP/s | / ours | max rel err |",
         "|---|---|---|---|---|---|---|"]
  ours = {(r["B"], r["T"], r["H"], r["D"], r["causal"]): r["fwd_ms"] for r in rows
          if r.get("kind") == "attention_backend" and r.get("impl") == "pallas (Triton)"
          and "fwd_ms" in r}
  for r in rows:
    if r.get("kind") != "attention_backend" or "B" not in r:
      continue
    shape = f"{r['B']},{r['T']},{r['H']},{r['D']}"
    mask = "causal" if r["causal"] else "none"
    note = r.get("error") or r.get("skipped")
    if note:
      out.append(f"| {shape} | {mask} | {r['impl']} | - | - | - | {note[:60]} |")
      continue
    mine = ours.get((r["B"], r["T"], r["H"], r["D"], r["causal"]))
    ratio = f"{r['fwd_ms'] / mine:.2f}x" if mine else "-"
    out.append(f"| {shape} | {mask} | {r['impl']} | {ms_text(r, 'fwd_ms')} | {r['fwd_tflops']:.0f} "
               f"| {ratio} | {r['rel_err']:.1e} |")
  return "\n".join(out)


def sweep_label(bs: BlockSizes | None) -> str:
  """`q,k/q,k/q,k` tiles of the forward, dQ and dK/dV kernels, plus warps and stages if set,
  `split` for a head dim read as power-of-two column tiles and `jnpexp` for `fast_exp2` off."""
  if bs is None:
    return "cudnn"
  b = [getattr(bs, name) for name in BlockSizes.names()]
  label = f"{b[0]},{b[1]}/{b[2]},{b[3]}/{b[4]},{b[5]}"
  if bs.num_warps:
    label += f" w{bs.num_warps}"
  if bs.num_stages:
    label += f" s{bs.num_stages}"
  if bs.split_head_dim:
    label += " split"
  if not bs.fast_exp2:
    label += " jnpexp"
  return label


def sweep(*, interpret: bool, emit: Callable[[dict], None], smoke: bool, iters: int = 20,
          deadline: float | None = None, shapes=()) -> list[dict]:
  """Times our kernel's forward and forward + backward under each tile configuration of SWEEP
  at SWEEP_CASES (those of `shapes`, `BxTxHxD` names, if any are given), then cuDNN's at the
  same case on a GPU, for reference.

  Each row also records its output's and gradients' largest difference from the first
  configuration's, relative to their largest value, so a wrong tiling cannot look fast.
  """
  rows = []
  cases = (((SMOKE_SHAPES[0], tuple(SMOKE_WINDOWS)), ((1, 64, 2, 48), ("causal",)))
           if smoke else sweep_cases(shapes))
  configs = list(SWEEP[:3] + SWEEP[-1:] if smoke else SWEEP)
  if jax.default_backend() == "gpu":
    configs.append(None)
  for shape, window_names in cases:
    q, k, v, do = _inputs(shape, jnp.bfloat16, seed=7)
    for window in ((SMOKE_WINDOWS if smoke else WINDOWS)[w] for w in window_names):
      first = []
      for bs in configs:
        if bs is not None and bs.split_head_dim and len(split_head_dim_widths(shape[3])) == 1:
          continue  # one tile: the same kernels as without split
        if deadline is not None and time.time() > deadline:
          return rows
        row = {"kind": "attention_sweep", "B": shape[0], "T": shape[1], "H": shape[2],
               "D": shape[3], "window": window, "config": sweep_label(bs)}
        if bs is not None:
          row["blocks"] = [getattr(bs, name) for name in BlockSizes.names()]
          row["num_warps"], row["num_stages"] = bs.num_warps, bs.num_stages
          row["split_head_dim"] = bs.split_head_dim
          row["fast_exp2"] = bs.fast_exp2
        try:
          if bs is None:
            fn = functools.partial(_dpa, window=window, implementation="cudnn")
          else:
            fn = functools.partial(_ours, window=window, interpret=interpret, block_sizes=bs)
          fwd, fwd_bwd = jax.jit(fn), jax.jit(_fwd_bwd(fn))
          if bs is not None:
            out = jax.tree.leaves(fwd_bwd(q, k, v, do))
            if not first:
              first.extend(out)
            row["rel_diff_vs_first"] = max(_rel_err(a, b) for a, b in zip(out, first))
          timed(row, "fwd", fwd, q, k, v, iters=iters)
          timed(row, "fwdbwd", fwd_bwd, q, k, v, do, iters=iters)
        except Exception as e:  # noqa: BLE001
          row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        rows.append(row)
        emit(row)
  return rows


# Compiled-kernel checks of what the timed shapes leave out: (B, T, H, K, D, dtype, window,
# segments). Tolerances are relative to the largest reference value.
FEATURE_CASES = ((2, 1000, 8, 2, 48, "bfloat16", 256, True), (2, 300, 4, 1, 128, "float32", None,
                                                               False),
                 (1, 777, 6, 3, 64, "bfloat16", 100, False))
SMOKE_FEATURE_CASES = ((2, 100, 4, 2, 48, "bfloat16", 40, True), (1, 70, 2, 1, 32, "float32", None,
                                                                  False))


def check_features(*, smoke: bool, interpret: bool, emit: Callable[[dict], None]) -> list[dict]:
  """Forward and gradients of our kernel against the reference: GQA, MQA, segments, padding."""
  rows = []
  for b, t, h, kv, d, dtype, window, segments in SMOKE_FEATURE_CASES if smoke else FEATURE_CASES:
    row = {"kind": "kernel_check", "B": b, "T": t, "H": h, "K": kv, "D": d, "dtype": dtype,
           "window": window, "segments": segments}
    try:
      keys = jax.random.split(jax.random.key(t), 4)
      q, do = (jax.random.normal(x, (b, t, h, d), jnp.float32).astype(dtype) for x in keys[:2])
      k, v = (jax.random.normal(x, (b, t, kv, d), jnp.float32).astype(dtype) for x in keys[2:])
      kwargs = {"causal": True, "window": window}
      if segments:  # three packed stories then padding (id 0) per row
        ids = jnp.minimum(jnp.arange(t) * 4 // t + 1, 3).at[-t // 8:].set(0)
        ids = jnp.broadcast_to(ids, (b, t)).astype(jnp.int32)
        kwargs.update(q_segment_ids_bt=ids, kv_segment_ids_bs=ids)
      ours = functools.partial(fa.flash_attention, interpret=interpret, **kwargs)
      ref = functools.partial(fa.flash_attention_reference, **kwargs)
      got = jax.jit(_fwd_bwd(ours))(q, k, v, do)
      f32 = [x.astype(jnp.float32) for x in (q, k, v, do)]
      want = jax.jit(_fwd_bwd(ref))(*f32)
      got_flat, want_flat = jax.tree.leaves(got), jax.tree.leaves(want)
      errors = [_rel_err(g, w) for g, w in zip(got_flat, want_flat)]
      tol = 3e-2 if dtype == "bfloat16" else 1e-4
      finite = all(bool(np.isfinite(np.asarray(g, np.float32)).all()) for g in got_flat)
      row.update(max_rel_err=max(errors), ok=bool(finite and max(errors) < tol), finite=finite)
    except Exception as e:  # noqa: BLE001
      row.update(ok=False, error=f"{type(e).__name__}: {str(e)[:300]}")
    rows.append(row)
    emit(row)
  return rows


def table(rows: list[dict]) -> str:
  """Markdown table of the attention rows: milliseconds, and ours relative to the others."""
  out = ["| shape | mask | impl | fwd ms | fwd+bwd ms | fwd+bwd TFLOP/s | max rel err |",
         "|---|---|---|---|---|---|---|"]
  for r in rows:
    if r.get("kind") != "attention" or "B" not in r:  # a whole-section row (skipped, failed)
      continue
    shape = f"{r['B']},{r['T']},{r['H']},{r['D']}"
    note = r.get("error") or r.get("skipped")
    if note:
      out.append(f"| {shape} | {r['mask']} | {r['impl']} | - | - | - | {note[:60]} |")
      continue
    err = max(r.get("rel_err", 0.0), r.get("grad_rel_err", 0.0))
    fb_ms = fb_tflops = "-"
    if "fwdbwd_ms" in r:
      fb_ms, fb_tflops = ms_text(r, "fwdbwd_ms"), f"{r['fwdbwd_tflops']:.0f}"
    out.append(f"| {shape} | {r['mask']} | {r['impl']} | {ms_text(r, 'fwd_ms')} | {fb_ms} | "
               f"{fb_tflops} | {err:.1e} |")
  return "\n".join(out)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--smoke", action="store_true", help="tiny shapes, Pallas interpreted")
  parser.add_argument("--sweep", action="store_true", help="also sweep our tile sizes")
  args = parser.parse_args()
  interpret = args.smoke or jax.default_backend() not in ("gpu", "tpu")
  emit = lambda row: print(json.dumps(row), flush=True)  # noqa: E731
  rows = run(smoke=args.smoke, interpret=interpret, emit=emit, iters=3 if args.smoke else 20)
  if args.sweep:
    rows += sweep(interpret=interpret, emit=emit, smoke=args.smoke, iters=3 if args.smoke else 20)
  print(table(rows))


if __name__ == "__main__":
  main()
