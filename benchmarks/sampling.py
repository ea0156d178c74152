"""Sampling throughput: our KV-cached decode beside transformers' `generate`, same shapes, same run.

  python benchmarks/sampling.py                          # llama 15m shape, batch 1 and 64, CPU
  python benchmarks/sampling.py --batch_sizes=1,64,256   # on a GPU
  python benchmarks/sampling.py --cache_layouts=chunked,whole --skip_transformers
  python benchmarks/sampling.py --skip_transformers --output=results.jsonl

Both sides: llama2.c's 15M shape (d 288, 6 layers, 6 heads, vocab 32000, tied embeddings) with
random weights, a one-token prompt, greedy decoding of exactly --new_tokens tokens (the
end-of-story token is forbidden, so both do the same work). Ours computes in --dtype, once for
each of --matmul_dtypes ("none": --dtype throughout; "bfloat16": `Sampler(matmul_dtype=...)`)
and each of --cache_layouts ("auto": the sampler's own choice; "chunked" or "whole":
`Sampler(chunked_cache=...)`); transformers runs once for each of --transformers_dtypes (its
whole model cast to that dtype).
Every printed row and JSONL row names its dtypes; the printout divides each of ours by each peer
of the same batch size. Rows are appended to --output as they are measured; a configuration that
fails, or starts past --budget_s, gets a row saying so and the run goes on. Figures are new tokens per second over --repeats timed runs after one warm-up
run (which compiles ours), median reported. The transformers model runs on PyTorch's CPU threads
(--threads, default: every core), or on the GPU where PyTorch sees one; there both sides' float32
matmuls use TF32 (JAX's default on a GPU, and PyTorch set to "high" to match).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import time

import jax
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tinystories_jax import models  # pylint: disable=g-import-not-at-top
from tinystories_jax.models import presets
from tinystories_jax.sampling import Sampler, SamplerConfig

VOCAB = 32000
EOS = 2


def ours(batch: int, new_tokens: int, repeats: int, dtype: str,
         matmul_dtype: str | None = None, cache: str = "auto") -> dict:
  cfg = presets.llama("15m", vocab_size=VOCAB, dtype=dtype)
  model = models.build(cfg, nnx.Rngs(0))
  sampler = Sampler(model, eos_id=EOS, matmul_dtype=matmul_dtype,
                    chunked_cache=None if cache == "auto" else cache == "chunked")
  prompts = [[1]] * batch
  config = SamplerConfig(temperature=0, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
  t0 = time.perf_counter()
  out = sampler.generate(prompts, config)
  warmup_s = time.perf_counter() - t0
  assert all(len(o[0].tokens) == new_tokens for o in out)
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    sampler.generate(prompts, config)
    times.append(time.perf_counter() - t0)
  t = statistics.median(times)
  label = dtype if matmul_dtype in (None, dtype) else f"{dtype}, {matmul_dtype} matmuls"
  if cache != "auto":
    label += f", {cache} cache"
  return {"system": f"tinystories_jax ({label})", "batch": batch, "new_tokens": new_tokens,
          "seconds": t, "new_tokens_per_s": batch * new_tokens / t, "warmup_s": warmup_s}


def transformers_generate(batch: int, new_tokens: int, repeats: int, threads: int,
                          dtype: str = "float32") -> dict:
  import torch  # noqa: PLC0415
  import transformers  # noqa: PLC0415

  torch.set_num_threads(threads)
  device = "cuda" if torch.cuda.is_available() else "cpu"
  if device == "cuda":
    # JAX runs float32 matmuls on a GPU with TF32 inputs by default; PyTorch does not. Match it,
    # so that the two "float32" columns do the same arithmetic.
    torch.set_float32_matmul_precision("high")
  cfg = presets.llama("15m", vocab_size=VOCAB)
  hf_cfg = transformers.LlamaConfig(
      vocab_size=VOCAB, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
      num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
      num_key_value_heads=cfg.num_kv_heads, max_position_embeddings=cfg.max_positions,
      rms_norm_eps=cfg.norm_eps, tie_word_embeddings=True, bos_token_id=1, eos_token_id=EOS,
      pad_token_id=0)
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(hf_cfg).eval().to(device=device,
                                                          dtype=getattr(torch, dtype))
  ids = torch.ones((batch, 1), dtype=torch.long, device=device)
  kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                pad_token_id=0, attention_mask=torch.ones_like(ids))
  with torch.inference_mode():
    out = model.generate(ids, **kwargs)
    assert out.shape == (batch, 1 + new_tokens)
    times = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      model.generate(ids, **kwargs)
      if device == "cuda":
        torch.cuda.synchronize()
      times.append(time.perf_counter() - t0)
  t = statistics.median(times)
  where = "cuda, TF32 matmuls" if device == "cuda" else f"{threads} threads"
  return {"system": f"transformers {transformers.__version__} generate ({dtype}, torch "
                    f"{torch.__version__}, {where})", "batch": batch,
          "new_tokens": new_tokens, "seconds": t, "new_tokens_per_s": batch * new_tokens / t}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch_sizes", default="1,64")
  parser.add_argument("--new_tokens", type=int, default=200)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--matmul_dtypes", default="none,bfloat16",
                      help="ours once per entry: none (--dtype throughout) or bfloat16 "
                           "(Sampler(matmul_dtype=...): matrix products on bfloat16 weights and "
                           "inputs with float32 accumulation, the rest in --dtype)")
  parser.add_argument("--cache_layouts", default="auto",
                      help="ours once per entry and matmul dtype: auto (the sampler's default: "
                           "chunked on a CPU, whole elsewhere), chunked or whole "
                           "(Sampler(chunked_cache=...))")
  parser.add_argument("--transformers_dtypes", default="float32,bfloat16",
                      help="the transformers peer once per entry")
  parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
  parser.add_argument("--skip_transformers", action="store_true")
  parser.add_argument("--output", default=None,
                      help="append result rows to this JSONL file, each as it is measured")
  parser.add_argument("--budget_s", type=float, default=None,
                      help="start no configuration after this many seconds (later ones get "
                           "a 'skipped' row)")
  args = parser.parse_args(argv)
  try:
    batches = [int(b) for b in args.batch_sizes.split(",")]
  except ValueError:
    print(f"error: --batch_sizes={args.batch_sizes} must be comma-separated integers, e.g. 1,64.",
          file=sys.stderr)
    return 2
  if args.new_tokens < 1 or args.new_tokens > 255:
    print("error: --new_tokens must be 1..255 (the 15m shape has 256 positions).",
          file=sys.stderr)
    return 2
  device = jax.devices()[0]
  machine = {"jax": jax.__version__, "device": device.device_kind, "platform": device.platform,
             "cpus": os.cpu_count(), "python": platform.python_version(),
             "date": time.strftime("%Y-%m-%d")}
  print(f"llama 15m shape, vocab {VOCAB}, random weights; {machine}")
  matmuls = [None if m == "none" else m for m in args.matmul_dtypes.split(",")]
  peers_dtypes = [] if args.skip_transformers else args.transformers_dtypes.split(",")
  caches = args.cache_layouts.split(",")
  if any(m not in (None, "bfloat16") for m in matmuls) or any(
      d not in ("float32", "bfloat16") for d in peers_dtypes) or any(
      c not in ("auto", "chunked", "whole") for c in caches):
    print("error: --matmul_dtypes takes none and bfloat16; --transformers_dtypes float32 and "
          "bfloat16; --cache_layouts auto, chunked and whole.", file=sys.stderr)
    return 2
  deadline = time.time() + args.budget_s if args.budget_s else None

  def write(row):  # each row as soon as it is measured: a run cut short keeps what it measured
    if args.output:
      with open(args.output, "a", encoding="utf-8") as f:
        f.write(json.dumps(dict(row, **machine)) + "\n")

  def measure(label, batch, fn):
    """One configuration, unless the budget is spent; a failure becomes a row, not the end."""
    if deadline is not None and time.time() > deadline:
      row = {"system": label, "batch": batch, "skipped": "time budget spent"}
    else:
      try:
        row = fn()
      except Exception as e:  # noqa: BLE001 - the other configurations still run
        row = {"system": label, "batch": batch, "error": f"{type(e).__name__}: {str(e)[:300]}"}
    write(row)
    if "new_tokens_per_s" in row:
      extra = f" (compile + first run {row['warmup_s']:.1f} s)" if "warmup_s" in row else ""
      print(f"  batch {batch:4d}  {row['system']:62s} {row['new_tokens_per_s']:8.1f} new "
            f"tokens/s{extra}", flush=True)
    else:
      print(f"  batch {batch:4d}  {label}: {row.get('skipped') or row.get('error')}", flush=True)
    return row

  for b in batches:
    ours_rows, peer_rows = [], []
    for m in matmuls:
      for c in caches:
        ours_rows.append(measure(
            f"tinystories_jax ({args.dtype}, matmuls {m or args.dtype}, {c} cache)", b,
            functools.partial(ours, b, args.new_tokens, args.repeats, args.dtype, m, c)))
    for d in peers_dtypes:
      peer_rows.append(measure(
          f"transformers generate ({d})", b,
          functools.partial(transformers_generate, b, args.new_tokens, args.repeats,
                            args.threads, d)))
    for row in ours_rows:
      for p in peer_rows:
        if "new_tokens_per_s" in row and "new_tokens_per_s" in p:
          print(f"  batch {b:4d}  {row['system']} / {p['system']}: "
                f"{row['new_tokens_per_s'] / p['new_tokens_per_s']:.2f}x", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
