"""Attention on the CPU at the llama 260k training shape: which formulation to register as `cpu`.

    python benchmarks/attention_cpu.py                 # attention alone, fwd and fwd+bwd
    python benchmarks/attention_cpu.py --train_step    # also the whole 260k train step

Shape: B=32, T=256, H=8, K=4, D=8, causal, float32 (the shape of the llama 260k CPU training target). The
implementations are timed interleaved (one call of each per round, median over rounds), so a
busy machine slows them alike and the ratios stay meaningful; absolute times are not. Every
output and gradient is checked against the float32 reference first.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from tinystories_jax.models import attention as attn  # noqa: E402
from tinystories_jax.models import attention_cpu  # noqa: E402


def _interleaved(fns: dict, args, rounds: int) -> dict[str, float]:
  times = {name: [] for name in fns}
  for _ in range(rounds):
    for name, fn in fns.items():
      t0 = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times[name].append(time.perf_counter() - t0)
  return {name: statistics.median(ts) * 1e3 for name, ts in times.items()}


def attention_only(rounds: int, window: int | None) -> list[dict]:
  b, t, h, k, d = 32, 256, 8, 4, 8
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.float32)
  kk = jnp.asarray(rng.standard_normal((b, t, k, d)), jnp.float32)
  v = jnp.asarray(rng.standard_normal((b, t, k, d)), jnp.float32)
  ct = jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.float32)

  def impl(name, **kw):
    def f(q, k, v):
      if name.startswith("cpu/"):
        return attention_cpu.cpu_attention(
            q, k, v, causal=True, window=window, q_segment_ids_bt=None, kv_segment_ids_bs=None,
            scale=d ** -0.5, block=int(name.split("/")[1]))
      return attn.attention(q, k, v, impl=name, window=window)
    return f

  names = ["reference", "xla", "cpu", "cpu/16", "cpu/64", "cpu/128"]
  fwd = {n: jax.jit(impl(n)) for n in names}
  grad = {n: jax.jit(jax.grad(lambda q, k, v, f=impl(n): jnp.sum(f(q, k, v) * ct),
                              argnums=(0, 1, 2))) for n in names}
  want, g_want = fwd["reference"](q, kk, v), grad["reference"](q, kk, v)
  for n in names:
    err = float(jnp.abs(fwd[n](q, kk, v) - want).max())
    g_err = max(float(jnp.abs(a - b_).max()) for a, b_ in zip(grad[n](q, kk, v), g_want))
    assert err < 1e-5 and g_err < 1e-4, (n, err, g_err)
  f_ms = _interleaved(fwd, (q, kk, v), rounds)
  g_ms = _interleaved(grad, (q, kk, v), rounds)
  return [{"kind": "cpu_attention", "impl": n, "window": window, "B": b, "T": t, "H": h, "K": k,
           "D": d, "fwd_ms": f_ms[n], "fwd_bwd_ms": g_ms[n]} for n in names]


def train_step(rounds: int) -> list[dict]:
  from tinystories_jax.models import presets  # noqa: PLC0415
  from tinystories_jax.training.benchmark import measure_train_throughput  # noqa: PLC0415

  rows = []
  for _ in range(max(1, rounds // 5)):  # alternate the two configs to share the machine's mood
    for impl in ("xla", "cpu"):
      cfg = presets.llama("260k", attention_impl=impl)
      r = measure_train_throughput(cfg, batch_size=32, seq_len=256, steps=5, warmup=2)
      rows.append({"kind": "cpu_train_step", "impl": impl, **{
          k: r[k] for k in ("tokens_per_s", "step_ms")}})
  return rows


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--rounds", type=int, default=9)
  parser.add_argument("--train_step", action="store_true")
  parser.add_argument("--jsonl", default="")
  args = parser.parse_args()
  rows = attention_only(args.rounds, None) + attention_only(args.rounds, 64)
  if args.train_step:
    rows += train_step(args.rounds)
  print(f"jax {jax.__version__}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
  print("| impl | window | fwd ms | fwd+bwd ms |\n|---|---|---|---|")
  for r in rows:
    if r["kind"] == "cpu_attention":
      print(f"| {r['impl']} | {r['window']} | {r['fwd_ms']:.1f} | {r['fwd_bwd_ms']:.1f} |")
  for r in rows:
    if r["kind"] == "cpu_train_step":
      print(f"train step 260k B=32 T=256, attention {r['impl']}: {r['step_ms']:.0f} ms, "
            f"{r['tokens_per_s']:.0f} tokens/s")
  if args.jsonl:
    with open(args.jsonl, "a") as f:
      for r in rows:
        f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
  main()
