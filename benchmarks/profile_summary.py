"""Where the device time of a profiled train step goes, from `jax.profiler` traces.

    python benchmarks/profile_summary.py bench_out/profiles.tar.gz [--steps=3] [--top=25]

Reads every `*.trace.json.gz` under the given archive, folder or files:
`benchmarks/gpu_check.py --profile=SHAPES` writes one trace per variant of our train step (3
steps each) into `$OUT/profiles.tar.gz`, and
`tinystories_jax.training.benchmark.measure_train_throughput(trace_dir=...)` writes one anywhere.
For each trace it prints the GPU's busy time per step and the span from the first kernel to the
last, the time by kind of kernel (library matmuls, our Pallas attention, XLA's reduction and
elementwise fusions, copies), and the most expensive kernels by name.

Kernels are named, not attributed to source lines: XLA runs the step's kernels inside CUDA graphs,
and the trace then records every kernel under the graph rather than its HLO op. A fusion's name
(`loop_convert_fusion`, `input_reduce_fusion_13`) is the HLO fusion's; `nvjet_*`/`sm90_xmma_*`
are cuBLAS matmuls (`f32f32_tf32` in the name: a float32 matmul), `gemm_fusion_dot*` XLA's own
Triton matmuls, `flash_attention_*` our Pallas kernels. Only the standard library is needed.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import pathlib
import tarfile
import tempfile

# First match wins: XLA's Triton GEMMs (gemm_fusion_*) come before cuBLAS's "gemm_" names.
KINDS = (
    ("attention (our Pallas kernels)", ("flash_attention",)),
    ("attention (cuDNN)", ("cudnn",)),
    ("matmul (XLA Triton GEMM)", ("gemm_fusion", "triton_gemm")),
    ("matmul (cuBLAS)", ("nvjet", "sm90_xmma", "cutlass", "gemm_", "gemv")),
    ("reduction fusions", ("reduce",)),
    ("elementwise fusions", ("fusion",)),
    ("copies", ("memcpy", "memset", "copy")),
)


def kind_of(kernel: str) -> str:
  for kind, keys in KINDS:
    if any(k in kernel for k in keys):
      return kind
  return "other"


def device_events(trace_json_gz: pathlib.Path) -> list[dict]:
  """Complete ("X") events on the trace's GPU processes."""
  with gzip.open(trace_json_gz, "rt") as f:
    events = json.load(f)["traceEvents"]
  gpus = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
          and "/device:GPU" in str(e.get("args", {}).get("name", ""))}
  return [e for e in events if e.get("ph") == "X" and e.get("pid") in gpus and "dur" in e]


def summarize(name: str, events: list[dict], steps: int, top: int) -> str:
  if not events:
    return f"## {name}: no GPU kernels in the trace (a CPU trace has none)\n"
  busy = sum(e["dur"] for e in events) / steps
  span = (max(e["ts"] + e["dur"] for e in events) - min(e["ts"] for e in events)) / steps
  by_kind: collections.Counter = collections.Counter()
  by_name: collections.Counter = collections.Counter()
  calls: collections.Counter = collections.Counter()
  for e in events:
    by_kind[kind_of(e["name"])] += e["dur"] / steps
    by_name[e["name"]] += e["dur"] / steps
    calls[e["name"]] += 1 / steps
  out = [f"## {name}: GPU busy {busy / 1e3:.2f} ms per step, first to last kernel "
         f"{span / 1e3:.2f} ms, {len(events) / steps:.0f} kernels per step", "",
         "| kind of kernel | ms/step | share | kernels/step |", "|---|---|---|---|"]
  kind_calls: collections.Counter = collections.Counter()
  for n, c in calls.items():
    kind_calls[kind_of(n)] += c
  out += [f"| {k} | {v / 1e3:.3f} | {100 * v / busy:.1f}% | {kind_calls[k]:.0f} |"
          for k, v in by_kind.most_common()]
  out += ["", "| ms/step | calls/step | kernel |", "|---|---|---|"]
  out += [f"| {v / 1e3:.3f} | {calls[k]:.0f} | `{k[:100]}` |" for k, v in by_name.most_common(top)]
  return "\n".join(out) + "\n"


def find_traces(paths: list[str], scratch: pathlib.Path) -> dict[str, pathlib.Path]:
  """{trace name: its trace.json.gz}; each archive is unpacked in its own folder under `scratch`.

  A trace is named by the folder given to `jax.profiler.trace` (gpu_check names it after the
  shape and variant); where that name occurs more than once (the same variant in two archives,
  or traced twice), the argument and the trace's time stamp are added to tell them apart.
  """
  found: list[tuple[str, pathlib.Path]] = []
  for i, p in enumerate(map(pathlib.Path, paths)):
    if p.is_file() and tarfile.is_tarfile(p):
      dest = scratch / f"{i}-{p.name}"
      with tarfile.open(p) as tar:
        tar.extractall(dest, filter="data")
      found += [(str(p), f) for f in sorted(dest.rglob("*.trace.json.gz"))]
    elif p.is_dir():
      found += [(str(p), f) for f in sorted(p.rglob("*.trace.json.gz"))]
    elif p.is_file():
      found.append((str(p), p))
    else:
      raise SystemExit(f"{p}: no such file or folder")

  def base(f: pathlib.Path) -> str:
    # <trace_dir>/plugins/profile/<timestamp>/<host>.trace.json.gz: named by <trace_dir>.
    return f.parts[f.parts.index("plugins") - 1] if "plugins" in f.parts else f.name

  counts = collections.Counter(base(f) for _, f in found)
  traces = {}
  for source, f in found:
    name = base(f)
    if counts[name] > 1:
      name = f"{name} [{source}, {f.parent.name}]"
    traces[name] = f
  return traces


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("paths", nargs="+",
                      help="profiles.tar.gz, trace folders or *.trace.json.gz files")
  parser.add_argument("--steps", type=int, default=3, help="train steps in each trace")
  parser.add_argument("--top", type=int, default=25, help="most expensive kernels listed")
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    traces = find_traces(args.paths, pathlib.Path(tmp))
    if not traces:
      raise SystemExit(f"no *.trace.json.gz under {args.paths}")
    for name, path in sorted(traces.items()):
      print(summarize(name, device_events(path), args.steps, args.top))


if __name__ == "__main__":
  main()
