"""The loss's passes over bf16 logits alone: Pallas one-pass vs two-pass vs XLA's.

    python benchmarks/loss_kernels.py [--out DIR]     # on a GPU

For the logits of the train shapes (32768 rows; vocab 4096, 32000 and GPT-Neo's 50257 padded to
50304) it times what one train step runs over them, each the median of timed calls after
warm-up: the two-pass kernels (`logsumexp` forward + `logit_grad` backward), the one-pass
kernel (`softmax_minus_onehot`) at `one_pass_tile`'s warps and at 8, and
XLA's passes (log-sum-exp, then the gradient) for reference. Rows also give the bytes the
one-pass kernel must move (the logits read once, written once) over its time.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from attention import time_ms  # noqa: E402
from tinystories_jax.kernels import cross_entropy as ce  # noqa: E402

CASES = ((32768, 32000, 32000), (32768, 4096, 4096), (32768, 50304, 50257))
WARPS = (None, 8)


def _inputs(n, vp, vocab):
  k = jax.random.split(jax.random.key(0), 2)
  x = (jax.random.normal(k[0], (1, n, vp), jnp.float32) * 4).astype(jnp.bfloat16)
  targets = jax.random.randint(k[1], (1, n), 0, vocab)
  return x, targets


def run(emit, iters: int = 20) -> list[dict]:
  rows = []
  for n, vp, vocab in CASES:
    x, targets = _inputs(n, vp, vocab)
    ones = jnp.ones((1, n), jnp.float32)

    def two_pass(x, t):
      lse = ce.logsumexp(x, vocab, interpret=False)
      return ce.logit_grad(x, lse, ones, ones, t, vocab, interpret=False)

    def xla(x, t):
      lse = ce.logsumexp_reference(x, vocab)
      return ce.logit_grad_reference(x, lse, ones, ones, t, vocab)

    fns = {"two_pass": two_pass, "xla": xla}
    for warps in dict.fromkeys((None, *WARPS)):
      fns[f"one_pass_w{warps or 'default'}"] = (
          lambda x, t, w=warps: ce.softmax_minus_onehot(x, t, vocab, interpret=False,
                                                        num_warps=w)[0])
    for name, fn in fns.items():
      row = {"kind": "loss_kernels", "impl": name, "rows": n, "padded_vocab": vp, "vocab": vocab}
      try:
        row["ms"] = time_ms(jax.jit(fn), x, targets, iters=iters)
        row["tb_per_s_read_write_once"] = 2 * x.size * 2 / row["ms"] / 1e9
      except Exception as e:  # noqa: BLE001 - one failing configuration must not end the run
        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
      rows.append(row)
      emit(row)
  return rows


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default="")
  args = parser.parse_args()
  out = pathlib.Path(args.out) / "loss_kernels.jsonl" if args.out else None

  def emit(row):
    print(json.dumps(row), flush=True)
    if out:
      with out.open("a") as f:
        f.write(json.dumps(row) + "\n")
  rows = run(emit)
  print("\n| rows x padded vocab | impl | ms | TB/s at one read + one write |\n|---|---|---|---|")
  for r in rows:
    print(f"| {r['rows']}x{r['padded_vocab']} | {r['impl']} | "
          + (f"{r['ms']:.3f} | {r['tb_per_s_read_write_once']:.2f} |" if "ms" in r
             else f"- | {r.get('error', '')[:80]} |"))


if __name__ == "__main__":
  main()
