"""The GPU check: attention kernels, training throughput and its peers, in one run.

    python3 benchmarks/gpu_check.py                   # on the GPU machine; results under $OUT
    python3 benchmarks/gpu_check.py --smoke           # anywhere, tiny shapes, Pallas interpreted
    python3 benchmarks/gpu_check.py --sections=attention,sweep

Sections, each guarded so one failure does not end the run, in this order:
  versions   library versions and the device
  kernel_check  our kernel compiled, forward and gradients against the float32 reference, on
             the features the timed shapes leave out (GQA, MQA, segments, padding, float32)
  matmul     bf16 matmul ceiling, 8192^3, median of timed calls after warm-up, each blocked on
  layers     model pieces written in two forms or more (models/layers.py), forward + backward
             at the train shapes (--train_shapes) in bf16, the GPU default first, in
             interleaved samples of calls issued back to back (as attention's):
             the llama MLP with gate and up paired on a new axis against split in two (the
             CPU's form) and against paired with the SwiGLU backward kernel (model.mlp=pallas);
             llama's q/k/v projection + rotary as one stacked matmul with rotary's
             halves swapped by a reverse, against the same with a concatenate and against three
             matmuls (the CPU's); GPT-Neo's MLP with gelu_new's tanh recomputed in the backward
             against saved; llama's residual add + RMSNorm in jnp against the Pallas kernels
             (model.norm=pallas). With only versions and layers it also runs on a CPU (the
             Pallas forms through the interpreter, their times meaningless there)
  backends   Triton or Mosaic GPU: forward passes of our kernel (Pallas on Triton), jax's stock
             Pallas Mosaic GPU kernel and cuDNN at two head_dim-64 shapes, unmasked (the
             comparison that runs on any CUDA runtime) and causal; before train, being short
  train      per model shape: our train step (tinystories_jax.training.benchmark) for each
             attention:loss[:options] variant (--train_variants; the options are listed
             at parse_variant), then the transformers peer at the same shape
             (LlamaForCausalLM + torch.compile; GPTNeoForCausalLM eager and compiled; bf16
             autocast, AdamW, grad clip, random tokens) in a child process, so the two
             frameworks do not share the GPU's memory pool and a run cut short still pairs
             what it measured
  attention  forward and forward+backward at four shapes, causal and window 256: our Pallas kernel,
             cuDNN, XLA, jax's stock Pallas (Triton) `mha` and its Mosaic GPU kernel (forward);
             each the median of samples of calls issued back to back (attention.py: time_ms)
  sweep      our kernel's tiles, warps and stages, beside cuDNN (--sweep_shapes picks cases)
  pipeline   benchmarks/input_pipeline.py (needs grain), in a child process
  sampling   benchmarks/sampling.py at batch 1, 64 and 256 (ours in float32 and with bfloat16
             matmuls, each with a chunked and a whole KV cache; transformers' generate in float32
             and bfloat16), in a child process
Every row goes to $OUT/gpu_check.jsonl as it is measured; the tables go to $OUT/gpu_check.md and,
shortened, to stdout at the end. `--budget_s` bounds the whole run: sections past it are skipped
with a row saying so. On a GPU or TPU, compiled programs go to jax's persistent compilation cache
in .jax_cache/ (--compilation_cache), so a later call on the same machine loads them.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import subprocess
import sys
import time
import traceback

# JAX would otherwise reserve most of the GPU's memory at start-up.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

SECTIONS = ("versions", "kernel_check", "matmul", "layers", "backends", "train", "attention",
            "sweep", "pipeline", "sampling")
# (family, preset, vocab, batch, seq, overrides): the shapes of the baselines.
# TinyStories-33M comes before llama 42M, the slowest to compile and run, so that a budget that
# runs out leaves the shape with the most earlier figures unmeasured. `--train_shapes` picks by
# "preset/vocab" (e.g. 15m/32000) or preset alone.
TRAIN_SHAPES = (("llama", "15m", 4096, 128, 256, {}), ("llama", "15m", 32000, 128, 256, {}),
                ("gpt_neo", "33m", 50257, 64, 512, {}), ("llama", "42m", 32000, 32, 1024, {}))
# Tiny models whose heads the kernels take (head_dim 16), for the CPU smoke run.
SMOKE_TRAIN_SHAPES = (
    ("llama", "260k", 512, 4, 64, {"num_heads": 4, "num_kv_heads": 2}),
    ("gpt_neo", "1m", 512, 4, 64, {"num_heads": 4, "num_layers": 2, "window": 16,
                                   "attention_layers": ("global", "local")}),
)
# attention:loss[:scan][:remat][:norm][:qkv][:mlp][:split][:jnpexp][:bqN][:bkN][:sN][:wN]
# [:flat[N]][:padN][:xla|:online|:kernel|:fwdgrad]
# variants of our step timed at every shape (":scan" sets scan_layers, ":remat"
# model.remat="block", ":norm" model.norm_impl="pallas", ":qkv" model.qkv_impl="pallas", ":mlp"
# model.mlp_impl="pallas" (these three at llama shapes only; ":qkv" needs pallas attention);
# ":split" the attention kernels' default blocks with split_head_dim, ":jnpexp" with
# fast_exp2 off (jnp's exponentials in the attention and loss kernels), ":bqN", ":bkN", ":sN",
# ":wN" with the forward's query and key tiles, every kernel's stages or warps set to N (as the
# sweep's "q,k/... wN sN" configurations) (all pallas attention only);
# ":flatN" optimizer.flatten_below=N, ":flat" N = FLAT_BELOW; ":padN" the fused loss's vocab
# padding multiple, ":pad1" none; its passes over the logits are train.loss_kernel's default,
# "auto", unless ":xla" (XLA, two passes), ":online" (XLA, one pass), ":kernel" (Pallas) or
# ":fwdgrad" (Pallas, the logit gradient made in the forward) says).
TRAIN_VARIANTS = "pallas:fused"
# ":flat": every parameter of the llama train shapes' blocks (the largest, 42m's 512 x 1376
# d_ff matrices, have 704,512 elements) but not their embedding tables (1,179,648 or more).
FLAT_BELOW = 1 << 20


class Run:
  """Collects rows: appends each to the JSONL file at once and keeps it for the tables."""

  def __init__(self, out_dir: pathlib.Path, budget_s: float):
    out_dir.mkdir(parents=True, exist_ok=True)
    self.path = out_dir / "gpu_check.jsonl"
    self.md_path = out_dir / "gpu_check.md"
    self.rows: list[dict] = []
    self.deadline = time.time() + budget_s

  def emit(self, row: dict) -> None:
    row = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **row}
    self.rows.append(row)
    with self.path.open("a") as f:
      f.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)

  def out_of_time(self) -> bool:
    return time.time() > self.deadline


class CacheEvents:
  """Counts the executables jax loads from its persistent compilation cache, and the compile
  seconds those loads saved (jax.monitoring's events), so that a row can say which of its
  compilations were loads."""

  HITS = "/jax/compilation_cache/cache_hits"
  SAVED = "/jax/compilation_cache/compile_time_saved_sec"

  def __init__(self):
    self.hits, self.saved_s = 0, 0.0

  def register(self) -> None:
    from jax import monitoring  # noqa: PLC0415
    monitoring.register_event_listener(self._event)
    monitoring.register_event_duration_secs_listener(self._duration)

  def _event(self, event: str, **_) -> None:
    if event == self.HITS:
      self.hits += 1

  def _duration(self, event: str, duration: float, **_) -> None:
    if event == self.SAVED:
      self.saved_s += duration

  def mark(self) -> tuple[int, float]:
    return self.hits, self.saved_s

  def since(self, mark: tuple[int, float]) -> dict:
    """What a row records: nothing where nothing since `mark` was loaded from the cache.

    jax stores a program's compile time in whole seconds and counts a load as saving that less
    the load's time: up to a second a load less than the truth, below 0 for a program that
    compiled in under a second."""
    hits = self.hits - mark[0]
    return {"cache_hits": hits, "compile_saved_s": self.saved_s - mark[1]} if hits else {}


CACHE_EVENTS = CacheEvents()


def use_compilation_cache(args) -> str | None:
  """Turns on jax's persistent compilation cache (`--compilation_cache`) for this process and,
  through the environment, its children; returns the folder, or None where it stays off.

  Every compiled program is written (no minimum compile time), and jax also keeps XLA's
  per-fusion GEMM autotuning results there, so a later row with the same matmuls reuses them.
  On the GPU machine the default folder, in the git-ignored `.jax_cache/` of the checkout,
  outlives a call: a second call on the same warm machine loads what the first compiled (the
  state initialiser of each shape, the default step) instead of compiling it again."""
  import jax  # noqa: PLC0415
  choice = args.compilation_cache
  if choice == "none" or (choice == "auto" and not args.on_accelerator):
    # Off even where JAX_COMPILATION_CACHE_DIR is set around the run (and in its children).
    jax.config.update("jax_enable_compilation_cache", False)
    os.environ["JAX_ENABLE_COMPILATION_CACHE"] = "false"
    return None
  folder = str(REPO / ".jax_cache") if choice == "auto" else str(pathlib.Path(choice).resolve())
  pathlib.Path(folder).mkdir(parents=True, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", folder)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = folder
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  CACHE_EVENTS.register()
  return folder


def _module_version(name: str) -> str:
  try:
    module = __import__(name)
    return str(getattr(module, "__version__", "present"))
  except Exception as e:  # noqa: BLE001
    return f"missing: {type(e).__name__}"


def section_versions(run: Run, args) -> None:
  import jax  # noqa: PLC0415
  mods = {m: _module_version(m) for m in ("jax", "jaxlib", "flax", "optax", "numpy", "torch",
                                          "transformers", "triton", "grain", "ml_collections")}
  run.emit({"kind": "versions", "python": platform.python_version(), "mods": mods,
            "backend": jax.default_backend(), "devices": [d.device_kind for d in jax.devices()],
            # Flags such as --xla_gpu_enable_triton_gemm=false change every row of the run.
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "smoke": args.smoke,
            # Entries already there were left by an earlier call: its programs load, not compile.
            "compilation_cache": args.cache_dir,
            "cache_entries_at_start": args.cache_entries_at_start})


def section_matmul(run: Run, args) -> None:
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  import attention as attention_bench  # noqa: PLC0415
  n = 512 if args.smoke else 8192
  ka, kb = jax.random.split(jax.random.key(0))
  a = jax.random.normal(ka, (n, n), jnp.float32).astype(jnp.bfloat16)
  b = jax.random.normal(kb, (n, n), jnp.float32).astype(jnp.bfloat16)
  ms = attention_bench.time_ms(jax.jit(jnp.matmul), a, b, iters=5 if args.smoke else 20,
                              back_to_back=False)
  run.emit({"kind": "ceiling", "what": "bf16 matmul", "n": n, "ms": ms,
            "tflops": 2 * n**3 / ms / 1e9})


def _layer_pieces(family, cfg, batch, seq, interpret):
  """(piece, {form: fn}, inputs) for the model pieces that have two forms or more. The first
  form is the GPU's default; the others are what it replaced (the CPU's form among them) or an
  option (the norm and SwiGLU kernels; through the Pallas interpreter where `interpret`). Each
  fn maps the inputs to a tuple."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  from tinystories_jax.kernels import rms_norm  # noqa: PLC0415
  from tinystories_jax.models import layers  # noqa: PLC0415

  d, f = cfg.d_model, cfg.d_ff
  keys = iter(jax.random.split(jax.random.key(0), 16))

  def bf16(shape, scale=1.0):
    return (jax.random.normal(next(keys), shape) * scale).astype(jnp.bfloat16)

  x = bf16((batch, seq, d))
  if family == "gpt_neo":
    def gelu_mlp(gelu):
      return lambda x, w1, b1, w2: (jnp.einsum("btf,fd->btd", gelu(
          jnp.einsum("btd,df->btf", x, w1), b1), w2),)
    plain = lambda h, b: jax.nn.gelu(h + b, approximate=True)  # noqa: E731
    return [("GPT-Neo MLP", {"tanh recomputed": gelu_mlp(layers.gelu_new),
                             "tanh saved": gelu_mlp(plain)},
             (x, bf16((d, f), 0.05), bf16((f,), 0.05), bf16((f, d), 0.05)))]
  h, kv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  positions = jnp.broadcast_to(jnp.arange(seq), (batch, seq))

  def with_rotary(project, rotary):
    def fn(x, wq, wk, wv):
      q, k, v = project(x, wq, wk, wv)
      return (rotary(q, positions, cfg.rope_theta), rotary(k, positions, cfg.rope_theta), v)
    return fn

  swiglu = lambda fn: lambda *a: (fn(*a),)  # noqa: E731

  def swiglu_kernel(*a):
    return (layers.swiglu_paired_kernel(*a, interpret=interpret),)

  def add_norm(fn, **kw):
    return lambda x, delta, scale: fn(x, scale, eps=cfg.norm_eps, delta_btd=delta,
                                      return_sum=True, **kw)

  return [("llama residual add + RMSNorm", {
              "jnp (XLA)": add_norm(rms_norm.rms_norm_reference),
              # Interpreted (off a GPU) its time says nothing about the kernels.
              "Pallas kernels (model.norm=pallas)" + (", interpreter" if interpret else ""):
                  add_norm(rms_norm.rms_norm, interpret=interpret)},
           (x, bf16((batch, seq, d)), 1.0 + 0.1 * jax.random.normal(next(keys), (d,)))),
          ("llama MLP", {"paired": swiglu(layers.swiglu_paired),
                         "split": swiglu(layers.swiglu_split),
                         "paired, Pallas backward kernel (model.mlp=pallas)"
                         + (", interpreter" if interpret else ""): swiglu_kernel},
           (x, bf16((d, f), 0.05), bf16((d, f), 0.05), bf16((f, d), 0.05))),
          ("llama q/k/v + rotary", {
              "stacked, rotary by reverse": with_rotary(layers.qkv_projection,
                                                        layers.rotary_by_reverse),
              "stacked, rotary by concatenate": with_rotary(layers.qkv_projection,
                                                            layers.rotary_by_concatenate),
              "separate, rotary by concatenate": with_rotary(layers.separate_qkv,
                                                             layers.rotary_by_concatenate)},
           (x, bf16((d, h, hd), 0.05), bf16((d, kv, hd), 0.05), bf16((d, kv, hd), 0.05)))]


def section_layers(run: Run, args) -> None:
  import statistics  # noqa: PLC0415

  import attention as attention_bench  # noqa: PLC0415
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  from tinystories_jax.models import presets  # noqa: PLC0415
  seen, wanted = set(), _names(args.train_shapes)
  for shape in SMOKE_TRAIN_SHAPES if args.smoke else TRAIN_SHAPES:
    family, name, vocab, batch, seq, overrides = shape
    if (family, name) in seen or not _shape_wanted(shape, wanted):
      continue
    seen.add((family, name))
    cfg = presets.get(family, name, vocab_size=vocab, **overrides)
    for piece, forms, inputs in _layer_pieces(family, cfg, batch, seq,
                                              args.smoke or not args.on_accelerator):
      if run.out_of_time():
        run.emit({"kind": "layers", "piece": piece, "model": f"{family}:{name}",
                  "skipped": "time budget spent"})
        continue
      outs = jax.eval_shape(next(iter(forms.values())), *inputs)
      cts = [jax.random.normal(jax.random.key(i), o.shape).astype(o.dtype)
             for i, o in enumerate(outs)]
      steps = {form: jax.jit(jax.grad(
          lambda *a, fn=fn: sum(jnp.sum((o * c).astype(jnp.float32)) for o, c in zip(fn(*a), cts)),
          argnums=tuple(range(len(inputs))))) for form, fn in forms.items()}
      times = {form: [] for form in forms}
      issue = {form: [] for form in forms}
      calls = {form: attention_bench.calls_per_sample(step, *inputs)  # compile, warm up
               for form, step in steps.items()}
      for i in range(3 if args.smoke else 40):  # interleaved, alternating which goes first
        for form in (list(forms) if i % 2 == 0 else list(forms)[::-1]):
          times[form].append(attention_bench.sample_ms(steps[form], inputs, calls[form],
                                                       issue[form]))
      for form in forms:
        run.emit({"kind": "layers", "piece": piece, "model": f"{family}:{name}",
                  "shape": f"{batch}x{seq}x{cfg.d_model}, d_ff {cfg.d_ff}, heads {cfg.num_heads}"
                           f"/{cfg.num_kv_heads}x{cfg.head_dim}",
                  "form": form, "gpu_default": form == next(iter(forms)),
                  "ms": statistics.median(times[form]), "calls_per_sample": calls[form],
                  "issue_ms": statistics.median(issue[form])})


def section_kernel_check(run: Run, args) -> None:
  import attention as attention_bench  # noqa: PLC0415
  attention_bench.check_features(smoke=args.smoke, interpret=args.smoke or not args.on_accelerator,
                                 emit=run.emit)


def section_attention(run: Run, args) -> None:
  import attention as attention_bench  # noqa: PLC0415
  interpret = args.smoke or not args.on_accelerator
  attention_bench.run(smoke=args.smoke, interpret=interpret, emit=run.emit,
                      iters=3 if args.smoke else args.attention_iters, deadline=run.deadline)


def section_backends(run: Run, args) -> None:
  import attention as attention_bench  # noqa: PLC0415
  attention_bench.backends(smoke=args.smoke, interpret=args.smoke or not args.on_accelerator,
                           emit=run.emit, iters=3 if args.smoke else args.attention_iters,
                           deadline=run.deadline)


def section_sweep(run: Run, args) -> None:
  import attention as attention_bench  # noqa: PLC0415
  attention_bench.sweep(interpret=args.smoke or not args.on_accelerator, emit=run.emit,
                        smoke=args.smoke, iters=3 if args.smoke else 20, deadline=run.deadline,
                        shapes=_names(args.sweep_shapes))


def parse_variant(text: str) -> dict:
  """`attention:loss[:scan][:remat][:norm][:qkv][:mlp][:split][:jnpexp][:bqN][:bkN][:sN][:wN]
  [:flat[N]][:padN][:xla|:online|:kernel|:fwdgrad]` as a dict; ValueError says what is wrong.

  `scan` sets scan_layers, `remat` model.remat="block", `norm` model.norm_impl="pallas" (the
  residual add + RMSNorm kernels), `qkv` model.qkv_impl="pallas" (the attention kernels read
  the stacked q/k/v projection and write its gradient; attention `pallas` only), `mlp`
  model.mlp_impl="pallas" (SwiGLU's backward kernel), these three at llama shapes only;
  `split` runs the Pallas attention kernels with `BlockSizes.split_head_dim` (the head dim as
  power-of-two column tiles; the same kernels where it is a power of two); `jnpexp` runs them
  and the loss kernels with `BlockSizes.fast_exp2` off (each exponential by jnp's exp2); `bqN`,
  `bkN`, `sN` and `wN` set the attention kernels' default `BlockSizes.block_q` and `block_k`
  (the forward's tiles), `num_stages` and `num_warps` (all three kernels'), in `tiles`; `flatN`
  optimizer.flatten_below=N (`flat`: FLAT_BELOW); with the fused loss, `padN` pads the output
  projection to a multiple of N rows (`pad1`: none; default 128), and its passes over the
  logits are train.loss_kernel="auto" (the default) unless `xla` (XLA's two passes),
  `online` (XLA's one-pass log-sum-exp, "xla_online"), `kernel` (the Pallas kernels,
  "pallas") or `fwdgrad` (the Pallas kernel that makes the logit gradient in the forward,
  "pallas_fwd_grad") names them.
  """
  from tinystories_jax.models import attention as attention_lib  # noqa: PLC0415
  from tinystories_jax.training import loss as loss_lib  # noqa: PLC0415
  impl, loss, *extra = text.split(":") + ([""] if ":" not in text else [])
  if impl not in attention_lib.implementations():
    raise ValueError(f"{text!r}: attention {impl!r} is not one of "
                     f"{attention_lib.implementations()}")
  if loss not in loss_lib.LOSS_IMPLS:
    raise ValueError(f"{text!r}: loss {loss!r} is not one of {loss_lib.LOSS_IMPLS}")
  variant = {"attention": impl, "loss": loss, "scan": False, "remat": False, "norm": "xla",
             "qkv": "xla", "mlp": "xla", "split": False, "jnpexp": False, "tiles": {},
             "flatten": 0, "loss_kernel": "auto", "pad": None}
  tile_fields = {"bq": "block_q", "bk": "block_k", "s": "num_stages", "w": "num_warps"}
  kernels = {"xla": "xla", "online": "xla_online", "kernel": "pallas",
             "fwdgrad": "pallas_fwd_grad"}
  for x in extra:
    if x in ("scan", "remat", "split", "jnpexp"):
      variant[x] = True
    elif x in ("norm", "qkv", "mlp"):
      variant[x] = "pallas"
    elif x in kernels:
      if variant["loss_kernel"] != "auto":
        raise ValueError(f"{text!r}: give at most one of xla, online, kernel and fwdgrad")
      variant["loss_kernel"] = kernels[x]
    elif x.rstrip("0123456789") in tile_fields and x.rstrip("0123456789") != x:
      field = tile_fields[x.rstrip("0123456789")]
      if field in variant["tiles"]:
        raise ValueError(f"{text!r}: {x!r} sets {field} a second time")
      variant["tiles"][field] = int(x[len(x.rstrip("0123456789")):])
    elif x.startswith("pad") and x[3:].isdigit() and int(x[3:]) >= 1:
      variant["pad"] = int(x[3:])
    elif x == "flat" or (x.startswith("flat") and x[4:].isdigit() and int(x[4:]) >= 1):
      variant["flatten"] = int(x[4:]) if x[4:] else FLAT_BELOW
    else:
      raise ValueError(f"{text!r}: unknown option {x!r}; options are scan, remat, norm, qkv, "
                       "mlp, split, jnpexp, bqN, bkN, sN, wN, flat, flatN, xla, online, kernel, "
                       "fwdgrad and padN (N >= 1)")
  if variant["qkv"] == "pallas" and impl != "pallas":
    raise ValueError(f"{text!r}: qkv runs inside the Pallas attention kernels; use attention "
                     "pallas with it")
  if variant["split"] and impl != "pallas":
    raise ValueError(f"{text!r}: split tiles the Pallas attention kernels; use attention "
                     "pallas with it")
  if variant["tiles"]:
    if impl != "pallas":
      raise ValueError(f"{text!r}: bqN, bkN, sN and wN tile the Pallas attention kernels; use "
                       "attention pallas with them")
    from tinystories_jax.kernels import flash_tiling  # noqa: PLC0415
    try:
      flash_tiling.BlockSizes(**variant["tiles"])
    except ValueError as e:
      raise ValueError(f"{text!r}: {e}") from None
  if variant["jnpexp"] and impl != "pallas":
    raise ValueError(f"{text!r}: jnpexp changes the Pallas attention (and loss) kernels; use "
                     "attention pallas with it")
  if loss != "fused" and (variant["loss_kernel"] != "auto" or variant["pad"] is not None):
    raise ValueError(f"{text!r}: xla, online, kernel, fwdgrad and padN apply to the fused loss "
                     "only")
  if loss == "fused" and variant["pad"] is None:
    variant["pad"] = loss_lib.VOCAB_MULTIPLE  # recorded, so padded rows say so
  return variant


def _train_ours(run: Run, args, shape) -> None:
  try:
    from tinystories_jax.kernels import flash_attention as fa  # noqa: PLC0415
    from tinystories_jax.kernels import flash_tiling  # noqa: PLC0415
    from tinystories_jax.models import presets  # noqa: PLC0415
    from tinystories_jax.training import benchmark  # noqa: PLC0415
    from tinystories_jax.training import loss as loss_lib  # noqa: PLC0415
  except ImportError as e:
    run.emit({"kind": "train", "system": "ours",
              "skipped": f"tinystories_jax.training not importable: {e}"})
    return
  family, name, vocab, batch, seq, overrides = shape
  texts = ["pallas:fused", "xla:chunked:scan"] if args.smoke else _variant_texts(args)
  seen = {}  # the step each variant resolves to at this shape -> the first variant naming it
  for text, variant in zip(texts, map(parse_variant, texts)):
    impl, loss, scan, remat = (variant[k] for k in ("attention", "loss", "scan", "remat"))
    pad, loss_kernel, norm = variant["pad"], variant["loss_kernel"], variant["norm"]
    qkv, mlp, flatten, split = (variant[k] for k in ("qkv", "mlp", "flatten", "split"))
    jnpexp, tiles = variant["jnpexp"], variant["tiles"]
    if loss == "fused":  # what "auto" runs here, recorded in the row
      loss_kernel = loss_lib.resolve_kernel(loss_kernel, loss_lib.padded_vocab(vocab, pad))
    if norm == "pallas" and family != "llama":
      print(f"# {family}:{name} {text}: the norm kernels are llama's (RMSNorm), not run here",
            flush=True)
      continue
    if qkv == "pallas" and family != "llama":
      print(f"# {family}:{name} {text}: the stacked q/k/v path is llama's (rotary), not run "
            "here", flush=True)
      continue
    if mlp == "pallas" and family != "llama":
      print(f"# {family}:{name} {text}: the MLP kernel is llama's (SwiGLU), not run here",
            flush=True)
      continue
    head_dim = presets.get(family, name, vocab_size=vocab, **overrides).head_dim
    if (split and len(flash_tiling.split_head_dim_widths(head_dim)) == 1
        and (head_dim > 16 or qkv != "pallas")):
      # One tile either way (48 is two), as without split (with rotary's halves inside the
      # kernels, above 16).
      split = False
    # A tile equal to this shape's default is the default's step.
    default_blocks = fa.default_block_sizes("gpu", head_dim)
    tiles = {k: v for k, v in tiles.items() if getattr(default_blocks, k) != v}
    step = (impl, loss, scan, remat, norm, qkv, mlp, split, jnpexp, tuple(sorted(tiles.items())),
            flatten, pad, loss_kernel)
    if step in seen:  # e.g. the default and ":kernel" on a GPU: time (and trace) it once
      print(f"# {family}:{name} {text}: the same step as {seen[step]}, not timed again",
            flush=True)
      continue
    seen[step] = text
    row = {"kind": "train", "system": "ours", "model": f"{family}:{name}", "vocab": vocab,
           "batch": batch, "seq": seq, "attention": impl, "loss_impl": loss}
    if scan:
      row["scan_layers"] = True
    if remat:
      row["remat"] = "block"
    if norm != "xla":
      row["norm_impl"] = norm
    if qkv != "xla":
      row["qkv_impl"] = qkv
    if mlp != "xla":
      row["mlp_impl"] = mlp
    if split:
      row["split_head_dim"] = True
    if jnpexp:
      row["fast_exp2"] = False
    if tiles:
      row["block_sizes"] = dict(tiles)
    if flatten:
      row["flatten_below"] = flatten
    if pad is not None:
      row["loss_vocab_multiple"] = pad
    if loss == "fused":
      row["loss_kernel"] = loss_kernel
    if run.out_of_time():
      run.emit({**row, "skipped": "time budget spent"})
      continue
    try:
      cfg = presets.get(family, name, vocab_size=vocab, dtype="bfloat16", attention_impl=impl,
                        scan_layers=scan, remat="block" if remat else "none", norm_impl=norm,
                        qkv_impl=qkv, mlp_impl=mlp,
                        **overrides)
      trace_dir = None
      if _shape_wanted(shape, _names(args.profile), empty_means_all=False):
        trace_dir = str(pathlib.Path(args.out) / "profile" / (
            f"{name}-{vocab}-{impl}-{loss}{'-scan' if scan else ''}{'-remat' if remat else ''}"
            f"{'-norm' if norm != 'xla' else ''}{'-qkv' if qkv != 'xla' else ''}"
            f"{'-mlp' if mlp != 'xla' else ''}{'-split' if split else ''}"
            f"{'-jnpexp' if jnpexp else ''}"
            f"{''.join(f'-{k}{v}' for k, v in sorted(tiles.items()))}"
            f"{f'-flat{flatten}' if flatten else ''}"
            f"{'' if pad is None else f'-pad{pad}'}"
            f"{'' if loss_kernel == 'xla' else '-' + loss_kernel.replace('_', '-')}"))
      blocks = {**({"split_head_dim": True} if split else {}),
                **({"fast_exp2": False} if jnpexp else {}), **tiles}
      mark = CACHE_EVENTS.mark()
      with fa.force_interpret(args.smoke or not args.on_accelerator), \
          fa.override_default_blocks(**blocks):
        result = benchmark.measure_train_throughput(
            cfg, batch_size=batch, seq_len=seq, steps=3 if args.smoke else args.train_steps,
            warmup=3, loss=loss, trace_dir=trace_dir, flatten_below=flatten,
            loss_kernel=loss_kernel, **({} if pad is None else {"loss_vocab_multiple": pad}))
      if trace_dir:
        row["trace"] = trace_dir
      row.update(result)
      row.update(CACHE_EVENTS.since(mark))  # compile_s and init_s then include loads
    except Exception as e:  # noqa: BLE001
      row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    run.emit(row)


def _train_peers(run: Run, args, index: int, shape) -> None:
  family, name, vocab, batch, seq, _ = shape
  if run.out_of_time():  # a child would still import torch and time at least one model
    run.emit({"kind": "train", "system": "peers", "model": f"{family}:{name}", "vocab": vocab,
              "batch": batch, "seq": seq, "skipped": "time budget spent"})
    return
  argv = [str(pathlib.Path(__file__).resolve()), "--peers_child", f"--peer_shape={index}",
          f"--out={args.out}", f"--train_steps={args.train_steps}",
          f"--budget_s={max(1.0, run.deadline - time.time()):.0f}"]
  if args.smoke:
    argv.append("--smoke")
  if args.smoke_compile:
    argv.append("--smoke_compile")
  before = run.path.stat().st_size if run.path.exists() else 0
  # A compile that starts just before the deadline may overrun it: give the child some grace.
  _child(run, argv, "peers", timeout=max(60.0, run.deadline - time.time()) + 60)
  with run.path.open() as f:  # the child appended its rows to the same file
    f.seek(before)
    run.rows += [json.loads(line) for line in f if line.strip()]


def _variant_texts(args) -> list[str]:
  return [v.strip() for v in args.train_variants.split(",") if v.strip()]


def _names(text: str) -> set[str]:
  return {x.strip() for x in text.split(",") if x.strip()}


def _shape_wanted(shape, wanted: set[str], empty_means_all: bool = True) -> bool:
  _, name, vocab, *_ = shape
  if not wanted:
    return empty_means_all
  return name in wanted or f"{name}/{vocab}" in wanted


def _pack_traces(run: Run, args) -> None:
  """Packs the XProf traces into one `$OUT/profiles.tar.gz` (what comes back from a machine
  is a few files, not a deep folder tree); `benchmarks/profile_summary.py` reads it."""
  import shutil  # noqa: PLC0415
  import tarfile  # noqa: PLC0415
  root = pathlib.Path(args.out) / "profile"
  if not root.is_dir():
    return
  archive = pathlib.Path(args.out) / "profiles.tar.gz"
  with tarfile.open(archive, "w:gz") as tar:
    tar.add(root, arcname="profile")
  shutil.rmtree(root)
  run.emit({"kind": "profile", "archive": str(archive), "bytes": archive.stat().st_size})


def section_train(run: Run, args) -> None:
  systems = {x.strip() for x in args.train_systems.split(",")}
  wanted = _names(args.train_shapes)
  # Leave the sections after this one their share of the budget.
  full_deadline, run.deadline = run.deadline, run.deadline - args.reserve_s
  try:
    for index, shape in enumerate(SMOKE_TRAIN_SHAPES if args.smoke else TRAIN_SHAPES):
      if not _shape_wanted(shape, wanted):
        continue
      if "ours" in systems:
        before = len(run.rows)
        _train_ours(run, args, shape)
        measured = any("tokens_per_s" in r for r in run.rows[before:])
        if not measured and "peers" in systems:
          family, name, vocab, batch, seq, _ = shape
          run.emit({"kind": "train", "system": "peers", "model": f"{family}:{name}",
                    "vocab": vocab, "batch": batch, "seq": seq,
                    "skipped": "none of ours measured at this shape"})
          continue
      if "peers" in systems:
        _train_peers(run, args, index, shape)
  finally:
    run.deadline = full_deadline
    _pack_traces(run, args)


# ------------------------------------------------------------------------------------------------
# transformers peers (run in a child process)


def _llama_hidden(d_model: int, multiple_of: int) -> int:
  hidden = int(2 * (4 * d_model) / 3)
  return multiple_of * -(-hidden // multiple_of)


def _peer_model(family: str, name: str, vocab: int, smoke: bool):
  """The transformers model of the same shape as our preset (smoke: as overridden above)."""
  import transformers  # noqa: PLC0415
  if family == "llama":
    d, layers, heads, kv_heads, ctx = {"15m": (288, 6, 6, 6, 256), "42m": (512, 8, 8, 8, 1024),
                                       "260k": (64, 5, 4, 2, 512)}[name]
    cfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=d, intermediate_size=_llama_hidden(d, 4 if smoke else 32),
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=ctx, rms_norm_eps=1e-5, tie_word_embeddings=True,
        use_cache=False, attn_implementation="sdpa")
    return transformers.LlamaForCausalLM(cfg), layers, d
  d, layers = (64, 2) if smoke else (768, 4)
  cfg = transformers.GPTNeoConfig(
      vocab_size=vocab, max_position_embeddings=2048, hidden_size=d, num_layers=layers,
      attention_types=[[["global", "local"], layers // 2]], num_heads=4 if smoke else 16,
      window_size=16 if smoke else 256, activation_function="gelu_new", layer_norm_epsilon=1e-5,
      resid_dropout=0.0, embed_dropout=0.0, attention_dropout=0.0, use_cache=False,
      bos_token_id=0, eos_token_id=0)
  return transformers.GPTNeoForCausalLM(cfg), layers, d


def _time_torch_training(model, *, batch: int, seq: int, vocab: int, compiled: bool, steps: int,
                         warmup: int) -> dict:
  import torch  # noqa: PLC0415
  device = "cuda" if torch.cuda.is_available() else "cpu"
  model = model.to(device).train()
  opt = torch.optim.AdamW(model.parameters(), lr=5e-4, betas=(0.9, 0.95), weight_decay=0.1,
                          fused=device == "cuda")
  forward = torch.compile(model) if compiled else model
  batches = [torch.randint(0, vocab, (batch, seq), device=device) for _ in range(2)]

  def step(tokens):
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
      loss = forward(input_ids=tokens, labels=tokens).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss

  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  t0 = time.perf_counter()
  step(batches[0])
  sync()
  compile_s = time.perf_counter() - t0
  for i in range(1, warmup):
    step(batches[i % 2])
  sync()
  t0 = time.perf_counter()
  for i in range(steps):
    loss = step(batches[i % 2])
  sync()
  elapsed = time.perf_counter() - t0
  return {"tokens_per_s": steps * batch * seq / elapsed, "step_ms": 1e3 * elapsed / steps,
          "first_step_s": compile_s, "loss": float(loss)}


def peers_child(run: Run, args) -> None:
  """Runs inside the child process: one row per transformers model and mode."""
  import torch  # noqa: PLC0415
  torch.backends.cuda.matmul.allow_tf32 = True
  torch.backends.cudnn.allow_tf32 = True
  family, name, vocab, batch, seq, _ = (SMOKE_TRAIN_SHAPES if args.smoke
                                        else TRAIN_SHAPES)[args.peer_shape]
  modes = ("eager", "compile") if family == "gpt_neo" else ("compile",)
  if args.smoke:
    modes = ("eager",) + (("compile",) if args.smoke_compile else ())
  for mode in modes:
    cls = "LlamaForCausalLM" if family == "llama" else "GPTNeoForCausalLM"
    row = {"kind": "train", "system": f"transformers {cls} {mode}", "model": f"{family}:{name}",
           "vocab": vocab, "batch": batch, "seq": seq}
    if run.out_of_time():
      run.emit({**row, "skipped": "time budget spent"})
      continue
    try:
      torch.manual_seed(0)
      model, layers, d = _peer_model(family, name, vocab, args.smoke)
      params = sum(p.numel() for p in model.parameters())
      result = _time_torch_training(model, batch=batch, seq=seq, vocab=vocab,
                                    compiled=mode == "compile",
                                    steps=3 if args.smoke else args.train_steps,
                                    warmup=3)
      flops_per_token = 6 * params + 12 * layers * d * seq
      row.update(result, params=params,
                 model_tflops=result["tokens_per_s"] * flops_per_token / 1e12,
                 torch=torch.__version__)
      del model
      if torch.cuda.is_available():
        torch.cuda.empty_cache()
    except Exception as e:  # noqa: BLE001
      row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    run.emit(row)


def _child(run: Run, argv: list[str], name: str, timeout: float) -> None:
  try:
    proc = subprocess.run([sys.executable, *argv], cwd=REPO, timeout=timeout,
                          capture_output=True, text=True)
    tail = (proc.stdout + proc.stderr)[-1500:]
    if proc.returncode:
      run.emit({"kind": name, "error": f"exit {proc.returncode}", "tail": tail})
  except subprocess.TimeoutExpired:
    run.emit({"kind": name, "error": f"timed out after {timeout:.0f} s"})


def section_pipeline(run: Run, args) -> None:
  script = REPO / "benchmarks" / "input_pipeline.py"
  try:
    import grain  # noqa: PLC0415,F401
  except ImportError as e:
    run.emit({"kind": "pipeline", "skipped": f"grain not importable ({e}); carry the wheels"})
    return
  out = pathlib.Path(args.out) / "input_pipeline.jsonl"
  argv = [str(script), f"--out={out}", "--batches=50" if args.smoke else "--batches=200"]
  _child(run, argv, "pipeline", timeout=max(30.0, min(150.0, run.deadline - time.time())))
  if out.exists():
    for line in out.read_text().splitlines():
      if line.strip():
        run.emit({"kind": "pipeline", **json.loads(line)})


def section_sampling(run: Run, args) -> None:
  out = pathlib.Path(args.out) / "sampling.jsonl"
  # The child starts no configuration past the budget; the timeout gives one that is running
  # then a minute more.
  argv = [str(REPO / "benchmarks" / "sampling.py"), f"--output={out}",
          f"--budget_s={max(1.0, run.deadline - time.time()):.0f}"]
  # Both cache layouts: the sampler keeps the cache whole off the CPU without a GPU figure yet.
  argv += ["--cache_layouts=chunked,whole"]
  argv += (["--batch_sizes=1,2", "--new_tokens=8", "--repeats=1"] if args.smoke
           else ["--batch_sizes=1,64,256", "--repeats=3"])
  _child(run, argv, "sampling", timeout=max(30.0, run.deadline - time.time()) + 60)
  if out.exists():
    for line in out.read_text().splitlines():
      if line.strip():
        run.emit({"kind": "sampling", **json.loads(line)})


# ------------------------------------------------------------------------------------------------
# tables


def _variant(r: dict) -> str:
  """How a row of ours was run: attention, loss, and the options set."""
  text = f"{r['attention']}, {r.get('loss_impl', 'chunked')} loss"
  if r.get("scan_layers"):
    text += ", scan"
  if r.get("remat") == "block":
    text += ", remat"
  if r.get("norm_impl") == "pallas":
    text += ", Pallas norm kernels"
  if r.get("qkv_impl") == "pallas":
    text += ", stacked q/k/v in the kernels"
  if r.get("mlp_impl") == "pallas":
    text += ", Pallas SwiGLU backward"
  if r.get("split_head_dim"):
    text += ", head dim split into power-of-two tiles"
  if r.get("fast_exp2") is False:
    text += ", attention and loss exp2 by jnp"
  if r.get("block_sizes"):
    text += ", attention " + " ".join(f"{k}={v}" for k, v in sorted(r["block_sizes"].items()))
  if r.get("flatten_below"):
    text += f", parameters under {r['flatten_below']:,} updated flat"
  if r.get("loss_vocab_multiple") == 1:
    text += ", vocab unpadded"
  elif "loss_vocab_multiple" in r:
    text += f", vocab padded to x{r['loss_vocab_multiple']}"
  if r.get("loss_kernel") == "xla_online" or r.get("loss_online_lse"):
    text += ", one-pass lse"
  elif r.get("loss_kernel") == "pallas":
    text += ", Pallas loss kernels"
  elif r.get("loss_kernel") == "pallas_fwd_grad":
    text += ", Pallas loss gradient made in the forward"
  elif r.get("loss_kernel") == "xla":
    text += ", XLA loss passes"
  return text


def _train_table(rows: list[dict]) -> str:
  out = ["| model | vocab | batch x seq | system | tokens/s | model TFLOP/s |",
         "|---|---|---|---|---|---|"]
  for r in rows:
    if r.get("kind") != "train" or "system" not in r:
      continue
    system = r["system"] + (f" ({_variant(r)})" if "attention" in r else "")
    shape = f"{r.get('batch', '?')}x{r.get('seq', '?')}"
    if "tokens_per_s" in r:
      out.append(f"| {r['model']} | {r['vocab']} | {shape} | {system} | "
                 f"{r['tokens_per_s'] / 1e6:.3f}M | {r['model_tflops']:.0f} |")
    else:
      out.append(f"| {r['model']} | {r['vocab']} | {shape} | {system} | - | "
                 f"{(r.get('error') or r.get('skipped', ''))[:70]} |")
  return "\n".join(out)


def _ratios(rows: list[dict]) -> list[str]:
  """The issue's targets as measured ratios (only where both sides were measured)."""
  att = {(r["impl"], r["T"], r["H"], r["D"], r["B"], r["mask"]): r for r in rows
         if r.get("kind") == "attention" and "fwdbwd_ms" in r}
  lines = []
  for (impl, t, h, d, b, mask), r in sorted(att.items()):
    if impl != "pallas":
      continue
    for other in ("cudnn", "stock_pallas_mha", "xla"):
      o = att.get((other, t, h, d, b, mask))
      if o:
        lines.append(f"attention {b},{t},{h},{d} {mask}: {other} fwd+bwd / ours = "
                     f"{o['fwdbwd_ms'] / r['fwdbwd_ms']:.2f}x")
    if mask == "causal":
      w = next((v for k, v in att.items() if k[0] == "pallas" and k[1:5] == (t, h, d, b)
                and k[5] != "causal"), None)
      if w:
        lines.append(f"attention {b},{t},{h},{d}: ours causal / ours {w['mask']} = "
                     f"{r['fwdbwd_ms'] / w['fwdbwd_ms']:.2f}x")
  train = [r for r in rows if r.get("kind") == "train" and "tokens_per_s" in r]
  for r in train:
    if r["system"] != "ours":
      continue
    for p in train:
      if p["system"] != "ours" and (p["model"], p["vocab"]) == (r["model"], r["vocab"]):
        lines.append(f"train {r['model']} vocab {r['vocab']} ours ({_variant(r)}) / "
                     f"{p['system']} = {r['tokens_per_s'] / p['tokens_per_s']:.2f}x")
  ceiling = next((r["tflops"] for r in rows if r.get("kind") == "ceiling"), None)
  for r in train:
    if ceiling and r["system"] == "ours" and r["model"] == "llama:42m":
      lines.append(f"train llama:42m ({_variant(r)}) model FLOP/s = "
                   f"{100 * r['model_tflops'] / ceiling:.0f}% of the measured matmul ceiling")
  return lines


def write_tables(run: Run) -> None:
  import attention as attention_bench  # noqa: PLC0415
  parts = []
  versions = next((r for r in run.rows if r.get("kind") == "versions"), None)
  if versions:
    parts.append(f"device: {versions['devices'][0]} ({versions['backend']}); "
                 f"versions: {json.dumps(versions['mods'])}")
    if versions.get("xla_flags"):
      parts.append(f"XLA_FLAGS: {versions['xla_flags']}")
  for r in run.rows:
    if r.get("kind") == "ceiling":
      parts.append(f"bf16 matmul {r['n']}^3: {r['tflops']:.1f} TFLOP/s")
    if r.get("kind") == "kernel_check" and "B" in r:
      parts.append(f"kernel check B{r['B']} T{r['T']} H{r['H']} K{r['K']} D{r['D']} {r['dtype']} "
                   f"window {r['window']} segments {r['segments']}: "
                   f"{'ok' if r.get('ok') else 'FAILED'} "
                   f"(max rel err {r.get('max_rel_err', float('nan')):.1e}) {r.get('error', '')}")
  pieces = [r for r in run.rows if r.get("kind") == "layers" and "ms" in r]
  skipped = [r for r in run.rows if r.get("kind") == "layers" and "skipped" in r]
  if pieces or skipped:
    parts += ["", "| fwd+bwd, bf16 | model | B x T x d, d_ff, heads | form | ms | "
              "GPU default / this |", "|---|---|---|---|---|---|"]
    parts += [f"| {r.get('piece', 'all')} | {r.get('model', '-')} | - | - | - | {r['skipped']} |"
              for r in skipped]
    for r in pieces:
      default = next((p["ms"] for p in pieces if (p["piece"], p["model"]) == (r["piece"],
                                                                               r["model"])
                      and p["gpu_default"]), None)
      ratio = "" if default is None or r["gpu_default"] else f"{default / r['ms']:.2f}x"
      form = f"{r['form']}{' (GPU default)' if r['gpu_default'] else ''}"
      parts.append(f"| {r['piece']} | {r['model']} | {r['shape']} | {form} | "
                   f"{attention_bench.ms_text(r, 'ms')} | {ratio} |")
  if any(r.get("kind") == "attention" and "B" in r for r in run.rows):
    parts += ["", attention_bench.table(run.rows)]
  if any(r.get("kind") == "attention_backend" and "B" in r for r in run.rows):
    parts += ["", attention_bench.backends_table(run.rows)]
  if any(r.get("kind") == "train" and "system" in r for r in run.rows):
    parts += ["", _train_table(run.rows)]
  parts += ["", *(f"- {line}" for line in _ratios(run.rows))]
  sampled = [r for r in run.rows if r.get("kind") == "sampling"]
  if sampled:
    parts += ["", "| sampling, llama 15m shape | batch | new tokens/s | ours / transformers |",
              "|---|---|---|---|"]
    for r in sampled:
      if "new_tokens_per_s" not in r:
        parts.append(f"| {r.get('system', '?')} | {r.get('batch', '?')} | - | "
                     f"{str(r.get('skipped') or r.get('error', ''))[:70]} |")
        continue
      peers = [p for p in sampled if p.get("batch") == r["batch"] and "new_tokens_per_s" in p
               and p["system"].startswith("transformers")]
      ratios = ("" if r["system"].startswith("transformers") else ", ".join(
          f"{r['new_tokens_per_s'] / p['new_tokens_per_s']:.2f}x vs "
          f"{p['system'].split(' (')[1].split(',')[0]}" for p in peers))
      parts.append(f"| {r['system']} | {r['batch']} | {r['new_tokens_per_s']:.0f} | {ratios} |")
  sweep = [r for r in run.rows if r.get("kind") == "attention_sweep" and "fwdbwd_ms" in r]
  if sweep:
    parts += ["", "| sweep shape | window | tiles: fwd q,k / dQ q,k / dK,dV q,k (warps, stages) "
              "| fwd ms | fwd+bwd ms | rel. diff vs first |", "|---|---|---|---|---|---|"]
    ms_text = attention_bench.ms_text
    parts += [f"| {r['B']},{r['T']},{r['H']},{r['D']} | {r['window']} | {r['config']} | "
              f"{ms_text(r, 'fwd_ms')} | {ms_text(r, 'fwdbwd_ms')} | "
              + (f"{r['rel_diff_vs_first']:.1e} |" if "rel_diff_vs_first" in r else "- |")
              for r in sweep]
  # Whole sections skipped for time or failed (their rows carry no shape of their own).
  section_notes = [r for r in run.rows if set(r) <= {"time", "kind", "skipped", "error",
                                                      "traceback"} and len(r) > 2]
  if section_notes:
    parts += ["", *(f"- section {r['kind']}: "
                    + (f"skipped ({r['skipped']})" if "skipped" in r
                       else f"failed ({str(r.get('error', ''))[:200]})") for r in section_notes)]
  text = "\n".join(parts) + "\n"
  run.md_path.write_text(text)
  print("\n" + text)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--smoke", action="store_true", help="tiny shapes; Pallas interpreted")
  parser.add_argument("--smoke_compile", action="store_true",
                      help="in smoke mode, also torch.compile the peers (slow on a CPU)")
  parser.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
  parser.add_argument("--budget_s", type=float, default=330.0)
  parser.add_argument("--sections", default=",".join(SECTIONS))
  parser.add_argument("--train_systems", default="ours,peers",
                      help="in the train section: ours, peers or both")
  parser.add_argument("--train_shapes", default="",
                      help="train shapes to run, as preset/vocab or preset (e.g. 15m/32000,33m); "
                           "default: all")
  parser.add_argument("--train_variants", default=TRAIN_VARIANTS,
                      help="our step's variants timed at every train shape, comma-separated "
                           "attention:loss[:scan][:remat][:norm][:qkv][:mlp][:split]"
                           "[:jnpexp][:flat[N]][:padN][:xla|:online|:kernel|:fwdgrad] "
                           "(e.g. pallas:fused:split)")
  parser.add_argument("--profile", default="",
                      help="train shapes (preset/vocab or preset) whose rows of ours also write "
                           "an XProf trace of 3 steps, packed into $OUT/profiles.tar.gz")
  parser.add_argument("--reserve_s", type=float, default=0.0,
                      help="seconds of the budget the train section leaves to the later sections")
  parser.add_argument("--train_steps", type=int, default=15, help="timed steps per train row")
  parser.add_argument("--attention_iters", type=int, default=20, help="timed samples per row")
  parser.add_argument("--sweep_shapes", default="",
                      help="the sweep's cases to run, as BxTxHxD (e.g. 64x512x12x64); "
                           "default: all")
  parser.add_argument("--compilation_cache", default="auto",
                      help="jax's persistent compilation cache: a folder, 'none', or 'auto' "
                           "(.jax_cache/ in the checkout on a GPU or TPU, none on a CPU)")
  parser.add_argument("--peers_child", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--peer_shape", type=int, default=0, help=argparse.SUPPRESS)
  args = parser.parse_args()
  run = Run(pathlib.Path(args.out), args.budget_s)
  if args.peers_child:
    peers_child(run, args)
    return
  for text in _variant_texts(args):
    try:
      parse_variant(text)
    except ValueError as e:
      parser.error(f"--train_variants: {e}")
  shapes = SMOKE_TRAIN_SHAPES if args.smoke else TRAIN_SHAPES
  train_names, profile_names = _names(args.train_shapes), _names(args.profile)
  known = {n for _, p, v, *_ in shapes for n in (p, f"{p}/{v}")}
  for flag, names in (("--train_shapes", train_names), ("--profile", profile_names)):
    if names - known:
      parser.error(f"unknown {flag} {sorted(names - known)}; choose from {sorted(known)}")
  traced = [s for s in shapes if _shape_wanted(s, profile_names, empty_means_all=False)]
  if traced and ("train" not in _names(args.sections) or "ours" not in _names(args.train_systems)
                 or any(not _shape_wanted(s, train_names) for s in traced)):
    parser.error("--profile traces rows of ours in the train section: name only shapes that "
                 "--train_shapes selects, with train in --sections and ours in --train_systems")
  import attention as attention_bench  # noqa: PLC0415 (benchmarks/attention.py)
  try:
    attention_bench.sweep_cases(_names(args.sweep_shapes))
  except ValueError as e:
    parser.error(f"--sweep_shapes: {e}")
  import jax  # noqa: PLC0415
  args.on_accelerator = jax.default_backend() in ("gpu", "tpu")
  # The layers section is plain JAX (no Pallas): it also runs on a CPU (every form).
  cpu_ok = _names(args.sections) <= {"versions", "layers"}
  if not args.on_accelerator and not args.smoke and not cpu_ok:
    # A GPU whose CUDA backend failed to start leaves JAX on the CPU: the full shapes would then
    # run interpreted there until the call's time ran out.
    parser.error(f"JAX sees no GPU or TPU (backend {jax.default_backend()!r}); check the CUDA "
                 "install (JAX_PLATFORMS=cuda shows why it failed), or pass --smoke on a CPU.")
  wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
  unknown = sorted(set(wanted) - set(SECTIONS))
  if unknown:
    parser.error(f"unknown sections {unknown}; choose from {list(SECTIONS)}")
  args.cache_dir = use_compilation_cache(args)
  # Programs only (jax names each entry "<name>-<key>-cache"; XLA's autotuning results are
  # in a folder beside them).
  args.cache_entries_at_start = (len(list(pathlib.Path(args.cache_dir).glob("*-cache")))
                                 if args.cache_dir else None)
  for name in SECTIONS:
    if name not in wanted:
      continue
    if run.out_of_time() and name != "versions":
      run.emit({"kind": name, "skipped": "time budget spent"})
      continue
    t0 = time.time()
    try:
      globals()[f"section_{name}"](run, args)
    except Exception as e:  # noqa: BLE001 - the next section still runs
      run.emit({"kind": name, "error": f"{type(e).__name__}: {e}",
                "traceback": traceback.format_exc()[-2000:]})
    print(f"# section {name}: {time.time() - t0:.1f} s", flush=True)
  write_tables(run)


if __name__ == "__main__":
  main()
