"""benchmarks/gpu_check.py refuses a mistyped variant or trace request before any device work."""

import json
import os
import subprocess
import sys
import time
import types

import jax.numpy as jnp
import pytest

import script_loader

SCRIPT = script_loader.BENCHMARKS / "gpu_check.py"


def _module():
  return script_loader.load("gpu_check")


def test_parse_variant():
  parse = _module().parse_variant
  assert parse("pallas:fused") == {"attention": "pallas", "loss": "fused", "scan": False,
                                   "remat": False, "norm": "xla", "qkv": "xla",
                                   "mlp": "xla", "split": False, "jnpexp": False, "tiles": {},
                                   "flatten": 0, "loss_kernel": "auto", "pad": 128}
  assert parse("cudnn:fused:pad1:online") == {"attention": "cudnn", "loss": "fused",
                                              "scan": False, "remat": False, "norm": "xla",
                                              "qkv": "xla", "mlp": "xla", "split": False,
                                              "jnpexp": False, "tiles": {}, "flatten": 0,
                                              "loss_kernel": "xla_online",
                                              "pad": 1}
  assert parse("pallas:fused:norm")["norm"] == "pallas"
  assert parse("pallas:fused:norm:qkv")["qkv"] == "pallas"
  assert parse("pallas:fused:norm:qkv:mlp")["mlp"] == "pallas"
  assert parse("pallas:fused:kernel")["loss_kernel"] == "pallas"
  assert parse("pallas:fused:flat")["flatten"] == 1 << 20
  assert parse("pallas:fused:flat5000")["flatten"] == 5000
  assert parse("pallas:fused:xla")["loss_kernel"] == "xla"
  assert parse("pallas:fused:norm:qkv:split")["split"] is True
  assert parse("pallas:fused:fwdgrad")["loss_kernel"] == "pallas_fwd_grad"
  assert parse("pallas:fused:jnpexp")["jnpexp"] is True
  assert parse("pallas:fused:bq64:s3")["tiles"] == {"block_q": 64, "num_stages": 3}
  assert parse("pallas:fused:split:bk32:w8:scan")["tiles"] == {"block_k": 32, "num_warps": 8}
  assert parse("xla:chunked:scan:remat") == {"attention": "xla", "loss": "chunked", "scan": True,
                                             "remat": True, "norm": "xla", "qkv": "xla",
                                             "mlp": "xla", "split": False, "jnpexp": False,
                                             "tiles": {}, "flatten": 0,
                                             "loss_kernel": "auto", "pad": None}
  for bad, says in (("pallas", "loss ''"), ("palas:fused", "attention 'palas'"),
                    ("pallas:fused:pad", "'pad'"), ("pallas:fused:pad0", "'pad0'"),
                    ("pallas:fused:onlne", "'onlne'"), ("pallas:fused:norms", "'norms'"),
                    ("pallas:plain:online", "fused loss only"),
                    ("pallas:chunked:kernel", "fused loss only"),
                    ("pallas:fused:online:kernel", "at most one"),
                    ("pallas:fused:xla:online", "at most one"),
                    ("pallas:fused:kernel:fwdgrad", "at most one"),
                    ("pallas:chunked:fwdgrad", "fused loss only"),
                    ("pallas:chunked:xla", "fused loss only"),
                    ("cudnn:fused:qkv", "use attention pallas"),
                    ("xla:fused:split", "use attention pallas"),
                    ("cudnn:fused:jnpexp", "use attention pallas"),
                    ("xla:fused:s3", "use attention pallas"),
                    ("pallas:fused:bq48", "block_q must be a power of two >= 16, got 48"),
                    ("pallas:fused:bk8", "block_k must be a power of two >= 16, got 8"),
                    ("pallas:fused:s0", "num_stages must be 1 to 8, got 0"),
                    ("pallas:fused:w3", "num_warps must be 1, 2, 4, 8 or 16, got 3"),
                    ("pallas:fused:s2:s3", "'s3' sets num_stages a second time"),
                    ("pallas:fused:bq", "'bq'"), ("pallas:fused:q64", "'q64'"),
                    ("pallas:fused:flat0", "'flat0'"), ("pallas:fused:flatx", "'flatx'")):
    with pytest.raises(ValueError, match=says):
      parse(bad)


def test_table_labels_tell_the_norm_kernels_apart():
  label = _module()._variant  # noqa: SLF001
  row = {"attention": "pallas", "loss_impl": "fused", "loss_kernel": "pallas"}
  assert "norm" not in label(row)
  assert "Pallas norm kernels" in label({**row, "norm_impl": "pallas"})
  assert "stacked q/k/v" not in label(row)
  assert "stacked q/k/v in the kernels" in label({**row, "qkv_impl": "pallas"})
  assert "SwiGLU" not in label(row)
  assert "Pallas SwiGLU backward" in label({**row, "mlp_impl": "pallas"})
  assert "exp2" not in label(row)
  assert "attention and loss exp2 by jnp" in label({**row, "fast_exp2": False})
  assert "flat" not in label(row)
  assert "parameters under 1,048,576 updated flat" in label({**row, "flatten_below": 1 << 20})
  assert "power-of-two tiles" not in label(row)
  assert "head dim split into power-of-two tiles" in label({**row, "split_head_dim": True})
  assert "gradient made in the forward" not in label(row)
  assert "block_q" not in label(row)
  assert ", attention block_q=64 num_stages=3" in label(
      {**row, "block_sizes": {"num_stages": 3, "block_q": 64}})
  assert "Pallas loss gradient made in the forward" in label({**row,
                                                              "loss_kernel": "pallas_fwd_grad"})


@pytest.mark.parametrize("argv, says", [
    (["--train_variants=pallas:fused:padx"], "--train_variants"),
    (["--profile=33m", "--train_shapes=42m"], "--profile traces rows of ours"),
    (["--profile=33m", "--sections=versions,sampling"], "--profile traces rows of ours"),
    (["--profile=99m"], "unknown --profile"),
    (["--sweep_shapes=64x512x12x65"], "no sweep case has shape 64x512x12x65"),
])
def test_bad_arguments_stop_before_any_work(argv, says, tmp_path):
  proc = subprocess.run([sys.executable, str(SCRIPT), f"--out={tmp_path}", *argv],
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2, proc.stderr
  assert says in proc.stderr
  assert not (tmp_path / "gpu_check.jsonl").exists()


def test_smoke_layers_section_times_every_form_of_each_piece(tmp_path):
  """The layers section runs anywhere at the smoke shapes: every form of every piece, and the
  table."""
  proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--sections=layers",
                         f"--out={tmp_path}"], capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  rows = [json.loads(line) for line in (tmp_path / "gpu_check.jsonl").read_text().splitlines()]
  forms = {(r["piece"], r["form"]): r for r in rows if r.get("kind") == "layers"}
  qkv, norm = "llama q/k/v + rotary", "llama residual add + RMSNorm"
  assert set(forms) == {(norm, "jnp (XLA)"),
                        (norm, "Pallas kernels (model.norm=pallas), interpreter"),
                        ("llama MLP", "paired"), ("llama MLP", "split"),
                        ("llama MLP", "paired, Pallas backward kernel (model.mlp=pallas), "
                                      "interpreter"),
                        (qkv, "stacked, rotary by reverse"),
                        (qkv, "stacked, rotary by concatenate"),
                        (qkv, "separate, rotary by concatenate"),
                        ("GPT-Neo MLP", "tanh recomputed"), ("GPT-Neo MLP", "tanh saved")}
  assert all(r["ms"] > 0 and r["calls_per_sample"] >= 1 and 0 <= r["issue_ms"]
             for r in forms.values())
  assert {k[1] for k, r in forms.items() if r["gpu_default"]} == {
      "jnp (XLA)", "paired", "stacked, rotary by reverse", "tanh recomputed"}
  table = (tmp_path / "gpu_check.md").read_text()
  assert "| llama q/k/v + rotary | llama:260k |" in table
  assert "| GPT-Neo MLP | gpt_neo:1m |" in table


def test_smoke_backends_section_times_our_forward_with_and_without_the_mask(tmp_path):
  """The backends section runs anywhere at its smoke shape (off a GPU: ours alone, interpreted),
  checks each output against the reference, and writes its table."""
  proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--sections=backends",
                         f"--out={tmp_path}"], capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  rows = [json.loads(line) for line in (tmp_path / "gpu_check.jsonl").read_text().splitlines()]
  rows = [r for r in rows if r.get("kind") == "attention_backend"]
  assert [(r["impl"], r["causal"]) for r in rows] == [("pallas (Triton)", False),
                                                      ("pallas (Triton)", True)]
  assert all(r["fwd_ms"] > 0 and r["rel_err"] < 1e-2 for r in rows), rows
  table = (tmp_path / "gpu_check.md").read_text()
  assert "| 1,128,2,64 | none | pallas (Triton) |" in table
  assert "| 1,128,2,64 | causal | pallas (Triton) |" in table


def test_the_stock_mosaic_kernels_runtime_refusal_is_a_skip_not_an_error(monkeypatch):
  """jax's stock Mosaic GPU attention refuses its causal form on CUDA runtimes it knows to
  miscompile for: the benchmark records that as a skipped row; other errors still propagate."""
  _module()  # puts benchmarks/ on sys.path
  import attention as attention_bench  # pylint: disable=import-outside-toplevel
  mgpu = pytest.importorskip("jax.experimental.pallas.ops.gpu.attention_mgpu")
  q = jnp.zeros((1, 128, 2, 64), jnp.float16)

  def refuse(*a, **k):
    raise ValueError("Causal masking not supported with cuda versions between 12.8.0 and "
                     "12.9.1 due to a ptxas miscompilation.")
  monkeypatch.setattr(mgpu, "attention", refuse)
  with pytest.raises(attention_bench.Unsupported, match="cuda versions"):
    attention_bench._stock_mgpu(q, q, q, None, causal=True)  # noqa: SLF001

  def other(*a, **k):
    raise ValueError("something else")
  monkeypatch.setattr(mgpu, "attention", other)
  with pytest.raises(ValueError, match="something else"):
    attention_bench._stock_mgpu(q, q, q, None, causal=True)  # noqa: SLF001


def test_variants_that_resolve_to_one_step_are_timed_once(tmp_path, monkeypatch, capsys):
  """On this CPU the default loss kernel ("auto") is "xla": `pallas:fused` and
  `pallas:fused:xla` are the same step, so it is timed (and would be traced) once."""
  from tinystories_jax.training import benchmark  # pylint: disable=import-outside-toplevel
  module = _module()
  timed = []
  monkeypatch.setattr(benchmark, "measure_train_throughput",
                      lambda cfg, **kw: timed.append(kw["loss_kernel"]) or {"step_ms": 1.0})
  run = module.Run(tmp_path, budget_s=600)
  args = type("Args", (), {"smoke": False, "on_accelerator": False, "train_steps": 1,
                           "profile": "", "out": str(tmp_path),
                           "train_variants": "pallas:fused,pallas:fused:xla,pallas:fused:online"})
  module._train_ours(run, args, module.SMOKE_TRAIN_SHAPES[0])  # noqa: SLF001
  assert timed == ["xla", "xla_online"]
  assert [r["loss_kernel"] for r in run.rows] == ["xla", "xla_online"]
  assert "pallas:fused:xla: the same step as pallas:fused" in capsys.readouterr().out


def test_the_norm_qkv_mlp_and_flat_variants_build_what_they_name(
    tmp_path, monkeypatch, capsys):
  from tinystories_jax.training import benchmark  # pylint: disable=import-outside-toplevel
  module = _module()
  built = []
  monkeypatch.setattr(benchmark, "measure_train_throughput",
                      lambda cfg, **kw: built.append((cfg.norm_impl, cfg.qkv_impl, cfg.mlp_impl,
                                                      kw["flatten_below"])) or {"step_ms": 1.0})
  run = module.Run(tmp_path, budget_s=600)
  args = type("Args", (), {"smoke": False, "on_accelerator": False, "train_steps": 1,
                           "profile": "", "out": str(tmp_path),
                           "train_variants": "pallas:fused,pallas:fused:norm,pallas:fused:qkv,"
                                             "pallas:fused:mlp,pallas:fused:flat"})
  llama, gpt_neo = module.SMOKE_TRAIN_SHAPES
  module._train_ours(run, args, llama)  # noqa: SLF001
  module._train_ours(run, args, gpt_neo)  # noqa: SLF001
  flat = module.FLAT_BELOW
  assert built == [("xla", "xla", "xla", 0), ("pallas", "xla", "xla", 0),
                   ("xla", "pallas", "xla", 0), ("xla", "xla", "pallas", 0),
                   ("xla", "xla", "xla", flat), ("xla", "xla", "xla", 0),
                   ("xla", "xla", "xla", flat)]
  assert [(r.get("norm_impl"), r.get("qkv_impl"), r.get("mlp_impl"), r.get("flatten_below"))
          for r in run.rows] == [
      (None, None, None, None), ("pallas", None, None, None), (None, "pallas", None, None),
      (None, None, "pallas", None), (None, None, None, flat), (None, None, None, None),
      (None, None, None, flat)]
  out = capsys.readouterr().out
  assert "the norm kernels are llama's" in out
  assert "the stacked q/k/v path is llama's" in out
  assert "the MLP kernel is llama's" in out


def test_a_timed_sample_issues_its_calls_back_to_back_and_blocks_once(monkeypatch):
  """`time_ms` times samples of calls issued without waiting, blocking on the last call's result
  alone; a call slower than a sample's length makes a sample of one call."""
  _module()  # puts benchmarks/ on sys.path
  import attention as attention_bench  # pylint: disable=import-outside-toplevel
  events = []
  monkeypatch.setattr(attention_bench.jax, "block_until_ready",
                      lambda x: events.append(("block", x)) or x)

  def fast(x):
    events.append(("call", x))
    return x + 1
  assert attention_bench.sample_ms(fast, (1,), 5) > 0
  assert events == [("call", 1)] * 5 + [("block", 2)]
  events.clear()
  calls = attention_bench.calls_per_sample(fast, 1)
  assert 1 < calls <= attention_bench.MAX_CALLS  # a call of microseconds: many to a sample
  events.clear()
  assert attention_bench.time_ms(fast, 1, warmup=2, iters=3) > 0
  kinds = "".join("b" if kind == "block" else "c" for kind, _ in events)
  # A compile and 2 warm-up calls, each blocked on; then 3 samples of the same n > 1 calls,
  # each blocked on once at its end.
  warm, samples = kinds[:6], kinds[6:].split("b")[:-1]
  assert warm == "cb" * 3 and len(samples) == 3 and kinds.endswith("b")
  assert len(set(samples)) == 1 and set(samples[0]) == {"c"} and len(samples[0]) > 1

  def slow(x):
    time.sleep(2 * attention_bench.SAMPLE_MS / 1e3)
    return x
  assert attention_bench.calls_per_sample(slow, 1, warmup=1) == 1
  events.clear()
  attention_bench.time_ms(fast, 1, warmup=1, iters=2, back_to_back=False)
  assert [e[0] for e in events] == ["call", "block"] * 4  # every call blocked on

  # Per call: a sample's whole time divided by its calls.
  clock = {"t": 0.0}
  monkeypatch.setattr(attention_bench.time, "perf_counter", lambda: clock["t"])

  def two_ms(x):
    clock["t"] += 0.002
    return x
  issued = []
  assert attention_bench.sample_ms(two_ms, (1,), 7, issued) == pytest.approx(2.0)
  assert issued == [pytest.approx(2.0)]  # the first call's issue: here, all of its time


def test_figures_the_host_paced_are_marked_in_the_tables():
  _module()  # puts benchmarks/ on sys.path
  import attention as attention_bench  # pylint: disable=import-outside-toplevel
  stats = {}
  assert attention_bench.time_ms(lambda: jnp.zeros(()), warmup=1, iters=3, stats=stats) > 0
  assert stats["calls"] >= 1 and stats["issue_ms"] >= 0
  row = {}
  attention_bench.timed(row, "fwd", lambda: jnp.zeros(()), iters=2)
  assert set(row) == {"fwd_ms", "fwd_calls", "fwd_issue_ms"}
  text = attention_bench.ms_text
  assert text({"fwd_ms": 1.0, "fwd_issue_ms": 0.95}, "fwd_ms") == "1.000 (host)"
  assert text({"fwdbwd_ms": 1.0, "fwdbwd_issue_ms": 0.2}, "fwdbwd_ms") == "1.000"
  assert text({"ms": 2.0, "issue_ms": 1.9}, "ms") == "2.000 (host)"
  assert text({"ms": 2.0}, "ms") == "2.000"  # rows from before the issue time was recorded


def test_smoke_sweep_runs_split_configurations_where_the_head_dim_is_split():
  """The sweep times a split_head_dim configuration only where the head dim is not a power of
  two (elsewhere it is the same kernels); its row says so, and matches the first config's."""
  _module()  # puts benchmarks/ on sys.path
  import attention as attention_bench  # pylint: disable=import-outside-toplevel
  rows = attention_bench.sweep(interpret=True, emit=lambda row: None, smoke=True, iters=1)
  split = [r for r in rows if r.get("split_head_dim")]
  assert [r["D"] for r in split] == [48] and split[0]["config"].endswith(" split")
  assert {r["D"] for r in rows if r.get("split_head_dim") is False} == {48, 64}
  for r in rows:
    assert "error" not in r, r
    assert r["rel_diff_vs_first"] < 1e-2, r  # bf16 outputs and gradients


def test_sweep_shapes_pick_the_sweeps_cases_in_their_order():
  _module()  # puts benchmarks/ on sys.path
  import attention as attention_bench  # pylint: disable=import-outside-toplevel
  assert attention_bench.sweep_cases() == attention_bench.SWEEP_CASES
  picked = attention_bench.sweep_cases({"16x2048x12x64", "64x512x12x64"})
  assert [attention_bench.shape_name(shape) for shape, _ in picked] == [
      "64x512x12x64", "16x2048x12x64"]
  assert picked[0][1] == ("causal",)
  with pytest.raises(ValueError, match="the cases are 128x256x6x48, 32x1024x8x64"):
    attention_bench.sweep_cases({"1x2x3x4"})


def test_split_variant_sets_the_kernels_blocks_where_the_head_dim_is_48(tmp_path, monkeypatch):
  """`:split` traces the step with split_head_dim in the attention's default blocks at a head
  dim of 48 (15m); at 64 (42m) it is the default's step, recorded once."""
  module = _module()
  from tinystories_jax.kernels import flash_attention as fa  # noqa: PLC0415
  from tinystories_jax.training import benchmark  # noqa: PLC0415
  calls = []

  def fake_measure(cfg, **kwargs):
    calls.append((cfg.head_dim, fa.default_block_sizes("gpu", cfg.head_dim).split_head_dim))
    return {"tokens_per_s": 1.0, "step_ms": 1.0, "model_tflops": 1.0}

  monkeypatch.setattr(benchmark, "measure_train_throughput", fake_measure)
  args = types.SimpleNamespace(smoke=False, on_accelerator=False, profile="", out=str(tmp_path),
                               train_steps=1, train_variants="pallas:fused,pallas:fused:split")
  run = module.Run(tmp_path, budget_s=600)
  shapes = {s[1]: s for s in module.TRAIN_SHAPES}
  module._train_ours(run, args, shapes["15m"])  # noqa: SLF001
  module._train_ours(run, args, shapes["42m"])  # noqa: SLF001
  assert calls == [(48, False), (48, True), (64, False)]
  rows = [r for r in run.rows if r.get("kind") == "train"]
  assert [r.get("split_head_dim", False) for r in rows] == [False, True, False]
  assert not fa.default_block_sizes("gpu", 48).split_head_dim  # the context was left


def test_jnpexp_variant_turns_fast_exp2_off_in_the_kernels_blocks(tmp_path, monkeypatch):
  """`:jnpexp` traces the step with fast_exp2 off in the attention's default blocks (the
  default has it on), records it in the row, and leaves the context afterwards."""
  module = _module()
  from tinystories_jax.kernels import flash_attention as fa  # noqa: PLC0415
  from tinystories_jax.training import benchmark  # noqa: PLC0415
  seen = []

  def fake_measure(cfg, **kwargs):
    seen.append(fa.default_block_sizes("gpu", cfg.head_dim).fast_exp2)
    return {"tokens_per_s": 1.0, "step_ms": 1.0, "model_tflops": 1.0}

  monkeypatch.setattr(benchmark, "measure_train_throughput", fake_measure)
  args = types.SimpleNamespace(smoke=False, on_accelerator=False, profile="", out=str(tmp_path),
                               train_steps=1, train_variants="pallas:fused,pallas:fused:jnpexp")
  run = module.Run(tmp_path, budget_s=600)
  module._train_ours(run, args, {s[1]: s for s in module.TRAIN_SHAPES}["42m"])  # noqa: SLF001
  assert seen == [True, False]
  rows = [r for r in run.rows if r.get("kind") == "train"]
  assert [r.get("fast_exp2", True) for r in rows] == [True, False]
  assert fa.default_block_sizes("gpu", 64).fast_exp2


def test_tile_variants_set_the_kernels_default_blocks(tmp_path, monkeypatch):
  """`:bq64:s3` traces the step with those fields in the attention's default blocks, records
  them in the row and leaves the context afterwards; the same tiles twice, or the default's
  tiles named, are timed once."""
  module = _module()
  from tinystories_jax.kernels import flash_attention as fa  # noqa: PLC0415
  from tinystories_jax.training import benchmark  # noqa: PLC0415
  seen = []

  def fake_measure(cfg, **kwargs):
    bs = fa.default_block_sizes("gpu", cfg.head_dim)
    seen.append((bs.block_q, bs.block_k, bs.num_stages, bs.num_warps))
    return {"tokens_per_s": 1.0, "step_ms": 1.0, "model_tflops": 1.0}

  monkeypatch.setattr(benchmark, "measure_train_throughput", fake_measure)
  args = types.SimpleNamespace(smoke=False, on_accelerator=False, profile="", out=str(tmp_path),
                               train_steps=1,
                               train_variants="pallas:fused,pallas:fused:bq64:s3,"
                                              "pallas:fused:s3:bq64,pallas:fused:w8,"
                                              "pallas:fused:bq128:bk64")
  run = module.Run(tmp_path, budget_s=600)
  module._train_ours(run, args, {s[1]: s for s in module.TRAIN_SHAPES}["42m"])  # noqa: SLF001
  default = fa.default_block_sizes("gpu", 64)
  assert seen == [(default.block_q, default.block_k, None, None), (64, default.block_k, 3, None),
                  (default.block_q, default.block_k, None, 8)]
  rows = [r for r in run.rows if r.get("kind") == "train"]
  assert [r.get("block_sizes") for r in rows] == [None, {"block_q": 64, "num_stages": 3},
                                                  {"num_warps": 8}]
  assert fa.default_block_sizes("gpu", 64) == default


def test_a_second_run_loads_its_programs_from_the_compilation_cache(tmp_path):
  """`--compilation_cache` keeps the compiled programs: a second run at the same shapes loads
  the state initialiser and the step of each variant, and its rows say so."""
  cache = tmp_path / "cache"

  def run(name):
    out = tmp_path / name
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--sections=versions,train",
                           "--train_systems=ours", "--train_shapes=260k",
                           f"--compilation_cache={cache}", f"--out={out}"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [json.loads(line) for line in (out / "gpu_check.jsonl").read_text().splitlines()]

  first = run("first")
  written = len(list(cache.glob("*-cache")))
  second = run("second")
  assert written >= 3  # an initialiser and two steps at least
  for rows, entries in ((first, 0), (second, written)):
    versions = next(r for r in rows if r["kind"] == "versions")
    assert versions["compilation_cache"] == str(cache)
    assert versions["cache_entries_at_start"] == entries
  trained = [[r for r in rows if r["kind"] == "train"] for rows in (first, second)]
  assert len(trained[0]) == len(trained[1]) == 2
  assert all("tokens_per_s" in r and r["init_s"] > 0 for rows in trained for r in rows)
  assert "cache_hits" not in trained[0][0]  # nothing to load yet
  assert all(r["cache_hits"] >= 2 and "compile_saved_s" in r for r in trained[1])
  # jax counts whole seconds less the load: a short compile's load may count below 0.
  assert sum(r["compile_saved_s"] for r in trained[1]) > 0


def test_the_compilation_cache_stays_off_on_a_cpu_unless_named(tmp_path):
  """`auto` is off on a CPU and `none` everywhere, even where the environment names a folder."""
  code = (
      "import sys, types; sys.path.insert(0, 'benchmarks'); import gpu_check, jax\n"
      "for choice, accel in (('auto', False), ('none', True)):\n"
      "  args = types.SimpleNamespace(compilation_cache=choice, on_accelerator=accel)\n"
      "  assert gpu_check.use_compilation_cache(args) is None\n"
      "jax.jit(lambda x: x + 1)(1.0).block_until_ready()\n")
  env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "cache"),
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
  proc = subprocess.run([sys.executable, "-c", code], cwd=script_loader.BENCHMARKS.parent,
                        env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert not list((tmp_path / "cache").glob("*-cache"))
