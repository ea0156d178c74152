"""Compiles the real train step for an H200 or H100 on a machine without a GPU.

    python benchmarks/gpu_compile.py --shapes=15m/32000 \
        --variants=pallas:fused:xla,pallas:fused:online,pallas:fused:kernel

For each shape and variant (the same names as `gpu_check.py`'s train section) it builds the train
step on abstract inputs, compiles it with XLA's deviceless GPU compiler and prints, for the
compiled step, how many kernels it launches and the bytes their operands and results take
(each counted once per kernel, so a buffer read by two kernels counts twice): by kind of kernel
and the largest kernels. A second total counts an operand that a fusion only slices or gathers
(directly or after elementwise ops) at the size of those slices (reading q out of a fused q/k/v
matmul's result reads a third of it; gathering the target logits reads one per row); the first
counts it whole. A scanned layer stack (`:scan`) counts its loop's kernels once per layer, and a
kernel that writes one layer's slice of a stacked buffer in place counts the slice. Both totals
are proxies for memory traffic, not timings: caches, the layout a kernel reads and its
arithmetic are not in them. It also prints XLA's peak temporary memory for the step
(`memory_analysis()`: activations, gradients and workspace, not the step's arguments).
It also shows that the Pallas kernels lower and compile for the target (Triton, then ptxas),
which the CPU interpreter does not check. With `--initialiser` it instead times compiling each
shape's train-state initialiser twice, each parameter drawn alone and as `models.build` draws
them (grouped by shape and dtype), with XLA's peak temporary memory for each.

Needs the CUDA plugin and its libraries beside jax (no GPU or driver is used); checked with the
GPU machine's jax 0.11.2 on Python 3.12, in its own environment:

    python3.12 -m venv /tmp/aot && /tmp/aot/bin/pip install "jax[cuda12]==0.11.2" flax optax
    /tmp/aot/bin/python benchmarks/gpu_compile.py

Without a GPU, XLA cannot autotune, so GEMMs that a GPU would hand to cuBLAS may show up as
XLA's Triton GEMMs here. The other fusions matched: for the llama 15M step at vocab 32000, the
204 loop and reduction fusions compiled here had the same result shapes (191 the same names)
as those in the H200 trace of 2026-11-26.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import pathlib
import re
import sys

# The plugin's start-up check asks the (absent) driver for its version.
os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "-1")

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

# Public device figures (NVIDIA's data sheets) in XLA's GpuTargetConfig text format.
_TARGET = """
gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {bandwidth}
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: {memory}
  shared_memory_per_block_optin: 232448
  cuda_compute_capability {{
    major: 9
  }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{
  major: 9
  minor: 8
}}
runtime_version {{
  major: 12
  minor: 9
}}
device_description_str: "{name}"
"""
TARGETS = {
    "h200": _TARGET.format(bandwidth=4_800_000_000_000, memory=150_000_000_000,
                           name="NVIDIA H200"),
    "h100": _TARGET.format(bandwidth=3_350_000_000_000, memory=85_000_000_000,
                           name="NVIDIA H100 80GB HBM3"),
}
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4,
          "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}


def shape_bytes(text: str) -> int:
  """Bytes of every array in an HLO shape string such as `(bf16[8,4]{1,0}, f32[8])`."""
  total = 0
  for dtype, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", text):
    if dtype in _BYTES:
      n = 1
      for d in filter(None, dims.split(",")):
        n *= int(d)
      total += n * _BYTES[dtype]
  return total


_INSTRUCTION = re.compile(r"\n\s+(?:ROOT )?(%[\w.\-]+) = (\(.*?\)|\S+) ([\w\-]+)\((.*?)\)")


def _computations(hlo_text: str) -> dict[str, str]:
  """Non-entry computations by name: the text of their bodies."""
  return {m.group(1): m.group(2) for m in
          re.finditer(r"\n(%[\w.\-]+) \([^\n]*\{((?:.|\n)*?)\n\}", hlo_text)}


# Ops whose every output element needs only the same element of each operand: a slice of
# their result reads only that part of their operands.
_ELEMENTWISE = {"abs", "add", "and", "bitcast", "bitcast-convert", "clamp", "compare",
                "convert", "cosine", "divide", "exponential", "exponential-minus-one", "log",
                "log-plus-one", "logistic", "maximum", "minimum", "multiply", "negate", "not",
                "or", "power", "rsqrt", "select", "sine", "sqrt", "subtract", "tanh"}


def _elements(shape: str) -> int:
  dims = re.search(r"\[([\d,]*)\]", shape)
  n = 1
  for d in filter(None, (dims.group(1) if dims else "").split(",")):
    n *= int(d)
  return n


def _fused_instructions(body: str) -> dict[str, tuple[str, str, list[str]]]:
  """name -> (shape, op, operand names in order) for each instruction of a fused computation."""
  return {name: (shape, op, re.findall(r"%[\w.\-]+", operands) if op != "parameter"
                 else [operands])
          for name, shape, op, operands in _INSTRUCTION.findall(body)}


def _below_bitcasts(instructions, name: str) -> str:
  """The instruction a chain of bitcasts starting at `name` takes its value from."""
  while instructions[name][1] == "bitcast" and instructions[name][2]:
    name = instructions[name][2][0]
  return name


def _root_parts(body: str, instructions) -> list[str]:
  """What a fused computation returns: its ROOT, or each element of a ROOT tuple."""
  root = re.search(r"\n\s+ROOT (%[\w.\-]+) =", body).group(1)
  return instructions[root][2] if instructions[root][1] == "tuple" else [root]


def _in_place_updates(body: str, instructions) -> dict[str, str]:
  """The dynamic-update-slices a fusion returns (directly, through bitcasts or in its result
  tuple) whose buffer is one of its parameters (through bitcasts): XLA writes those slices into
  the parameter's buffer in place. {update: that parameter}."""
  found = {}
  for part in _root_parts(body, instructions):
    update = _below_bitcasts(instructions, part)
    if instructions[update][1] == "dynamic-update-slice":
      buffer = _below_bitcasts(instructions, instructions[update][2][0])
      if instructions[buffer][1] == "parameter":
        found[update] = buffer
  return found


def _parameter_reads(body: str) -> dict[int, int]:
  """For a fused computation, the bytes read of each parameter that only reaches slices or
  gathers (through bitcasts and same-shape elementwise ops): the elements those take, not the
  whole parameter. A parameter that is only the buffer of updates written in place
  (`_in_place_updates`) is not read: 0."""
  instructions = _fused_instructions(body)
  uses, shapes, params = collections.defaultdict(list), {}, {}
  root = re.search(r"\n\s+ROOT (%[\w.\-]+) =", body)
  if root:  # the fusion's result: whatever reaches it is read whole
    uses[root.group(1)].append((None, "ROOT", 0))
  for name, (shape, op, operands) in instructions.items():
    shapes[name] = shape
    if op == "parameter":
      params[name] = int(operands[0])
      continue
    for position, a in enumerate(operands):
      uses[a].append((name, op, position))
  in_place = _in_place_updates(body, instructions) if root else {}
  reads = {}
  for pname, index in params.items():
    if pname in in_place.values() and _only_updated(pname, uses, in_place):
      reads[index] = 0
      continue
    size = _elements(shapes[pname])
    frontier, visited, taken, partial = [pname], {pname}, 0, True
    while frontier and partial:
      for user, op, position in uses[frontier.pop()]:
        if op in _ELEMENTWISE and (op == "bitcast" or _elements(shapes[user]) == size):
          if user not in visited:
            visited.add(user)
            frontier.append(user)
        elif op in ("slice", "dynamic-slice", "gather") and position == 0:
          taken += _elements(shapes[user])
        else:
          partial = False
          break
    if partial and taken:
      reads[index] = min(taken, size) * shape_bytes(shapes[pname]) // max(size, 1)
  return reads


def _only_updated(name: str, uses, in_place: dict[str, str]) -> bool:
  """Whether every use of `name` (through bitcasts) is as the buffer of an in-place update."""
  for user, op, position in uses[name]:
    if op == "bitcast":
      if not _only_updated(user, uses, in_place):
        return False
    elif not (user in in_place and position == 0):
      return False
  return bool(uses[name])


def _written_bytes(body: str, result: str) -> int:
  """Bytes a fusion writes: its result, except that an update written in place
  (`_in_place_updates`: a scan storing one layer's values into its stacked output) writes only
  the slice."""
  if not re.search(r"\n\s+ROOT ", body):
    return shape_bytes(result)
  instructions = _fused_instructions(body)
  in_place = _in_place_updates(body, instructions)
  total = 0
  for part in _root_parts(body, instructions):
    update = _below_bitcasts(instructions, part)
    total += shape_bytes(instructions[instructions[update][2][1]][0] if update in in_place
                         else instructions[part][0])
  return total


def kernels(hlo_text: str) -> list[dict]:
  """The fusions and custom calls of the entry computation and of the while loops it runs (a
  scanned layer stack), with operand and result bytes per step.

  `bytes` counts every operand whole; `read_bytes` counts an operand that the fusion only
  slices or gathers at the size of those slices (a kernel that reads q out of a fused q/k/v
  matmul's result reads a third of it). In both, a fusion that writes a slice of a buffer in
  place (dynamic-update-slice) counts the slice, not the buffer. A Pallas call's operands count
  whole: what its BlockSpecs read is not in the HLO (the stacked attention kernels read only the
  value slots of the stacked projection, and write the slots of an aliased buffer in place).
  A kernel inside a loop has `calls` (launches per step: the loop's known trip count, 1 when
  the HLO does not give one) and bytes for all of them; elsewhere `calls` is 1.
  """
  computations = _computations(hlo_text)
  return _kernels_in(hlo_text[hlo_text.index("\nENTRY"):], computations, 1)


def _kernels_in(body: str, computations: dict[str, str], calls: int) -> list[dict]:
  values = dict(re.findall(r"\n\s+(?:ROOT )?(%[\w.\-]+) = (\([^=]*?\)|\S+) ", body))
  out = []
  for m in re.finditer(
      r"\n\s+(?:ROOT )?(%[\w.\-]+) = (\(.*?\)|\S+) (fusion|custom-call|while)\((.*?)\)(.*)",
      body):
    name, result, op, operands, rest = m.groups()
    if op == "while":
      loop = re.search(r"body=(%[\w.\-]+)", rest)
      trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', rest)
      if loop and loop.group(1) in computations:
        out += _kernels_in(computations[loop.group(1)], computations,
                           calls * (int(trips.group(1)) if trips else 1))
      continue
    # Every fifth operand is printed after an /*index=N*/ comment.
    args = re.findall(r"%[\w.\-]+", operands)
    target = re.search(r'custom_call_target="([^"]+)"', rest)
    fusion_kind = re.search(r'"kind":"(\w+)"', rest)
    if "pallas" in name or (target and "triton" in target.group(1)):
      kind = "Pallas (Triton)"
    elif (target and ("gemm" in target.group(1) or "blas" in target.group(1).lower())) or (
        fusion_kind and "gemm" in fusion_kind.group(1)):
      kind = "matmul"
    elif fusion_kind and "triton" in fusion_kind.group(1):
      kind = "XLA Triton fusion"
    elif op == "custom-call":
      kind = f"custom call {target.group(1) if target else ''}"
    else:
      kind = "XLA fusion"
    whole = [shape_bytes(values.get(a, "")) for a in args]
    called = re.search(r"calls=(%[\w.\-]+)", rest)
    fused = computations.get(called.group(1), "") if op == "fusion" and called else ""
    reads = _parameter_reads(fused) if fused else {}
    wrote = _written_bytes(fused, result) if fused else shape_bytes(result)
    in_place = {i: 0 for i, b in reads.items() if b == 0}
    out.append({"name": name.lstrip("%"), "kind": kind, "result": result, "calls": calls,
                "bytes": calls * (wrote + sum(in_place.get(i, b) for i, b in enumerate(whole))),
                "read_bytes": calls * (wrote + sum(reads.get(i, b)
                                                   for i, b in enumerate(whole)))})
  return out


def _setup_jax(target: str):
  import jax  # noqa: PLC0415
  from jax.experimental import topologies  # noqa: PLC0415

  try:
    topology = topologies.get_topology_desc(platform="cuda", target_config=TARGETS[target],
                                            topology="1x1x1")
  except Exception as e:  # noqa: BLE001
    sys.exit(f"gpu_compile: no deviceless CUDA compiler ({type(e).__name__}: {e}); install "
             f'"jax[cuda12]=={jax.__version__}" in this environment (checked with jax 0.11.2 '
             "on Python 3.12).")
  # The project's platform checks (which attention kernel, whether Pallas compiles) read
  # jax.default_backend(), which names this machine's CPU; the target is a GPU.
  jax.default_backend = lambda: "gpu"
  return topology


def _train_setup(topology, cfg, flatten_below: int = 0):
  """(mesh, optimizer config, layout, optimizer, state shardings) on the one-device target, as
  the step and the initialiser are compiled with."""
  import jax  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415

  from tinystories_jax.parallel import mesh as mesh_lib  # noqa: PLC0415
  from tinystories_jax.training import optimizer as opt_lib  # noqa: PLC0415
  from tinystories_jax.training import state as state_lib  # noqa: PLC0415

  devices = np.asarray(topology.devices).reshape(1, 1, 1)
  mesh = jax.sharding.Mesh(devices, mesh_lib.AXES,
                           axis_types=(jax.sharding.AxisType.Auto,) * 3)
  opt_cfg = opt_lib.OptimizerConfig(lr=5e-4, schedule="cosine", warmup_steps=10, clip_norm=1.0,
                                    flatten_below=flatten_below)
  layout = state_lib.model_layout(cfg)
  tx = opt_lib.make_optimizer(opt_cfg, 100, layout.logical_names, layout.abstract_params)
  return mesh, opt_cfg, layout, tx, state_lib.state_shardings(layout, tx, mesh)


def compile_step(topology, family, preset, vocab, batch, seq, variant):
  """The compiled train step for one shape and variant (`jax.stages.Compiled`)."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  from tinystories_jax.models import presets  # noqa: PLC0415
  from tinystories_jax.parallel import rules  # noqa: PLC0415
  from tinystories_jax.training import optimizer as opt_lib  # noqa: PLC0415
  from tinystories_jax.training import state as state_lib  # noqa: PLC0415
  from tinystories_jax.training import step as step_lib  # noqa: PLC0415

  cfg = presets.get(family, preset, vocab_size=vocab, dtype="bfloat16",
                    attention_impl=variant["attention"], scan_layers=variant["scan"],
                    remat="block" if variant["remat"] else "none", norm_impl=variant["norm"],
                    qkv_impl=variant["qkv"], mlp_impl=variant["mlp"])
  mesh, opt_cfg, layout, tx, shardings = _train_setup(topology, cfg, variant["flatten"])
  state = state_lib.abstract_state(layout, tx, shardings)
  extra = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                       layout.abstract_extra, shardings.extra)
  row = rules.batch_sharding(mesh, 2)
  batch = {k: jax.ShapeDtypeStruct((batch, seq), jnp.float32 if k == "loss_mask" else jnp.int32,
                                   sharding=row) for k in ("inputs", "targets", "loss_mask")}
  step_cfg = step_lib.StepConfig(
      loss_impl=variant["loss"], loss_kernel=variant["loss_kernel"],
      **({} if variant["pad"] is None else {"loss_vocab_multiple": variant["pad"]}))
  step = step_lib.jit_train_step(
      step_lib.make_train_step(layout.graphdef, tx, opt_lib.learning_rate(opt_cfg, 100),
                               step_cfg),
      shardings.state, shardings.extra, {k: row for k in batch}, mesh)
  from tinystories_jax.kernels import flash_attention as fa  # noqa: PLC0415
  blocks = {**({"split_head_dim": True} if variant["split"] else {}),
            **({"fast_exp2": False} if variant["jnpexp"] else {}), **variant["tiles"]}
  with fa.override_default_blocks(**blocks):
    lowered = step.lower(state, extra, batch)
  return lowered.compile()


def compile_initialiser(topology, family, preset, vocab, *, grouped: bool):
  """(seconds, kernels, peak temporary bytes or None) compiling the train state's initialiser
  (parameters, AdamW state) as the trainer does, with `models.build`'s grouped normal draws or
  each parameter drawn alone."""
  import contextlib  # noqa: PLC0415
  import time  # noqa: PLC0415

  from tinystories_jax.models import layers, presets  # noqa: PLC0415
  from tinystories_jax.training import state as state_lib  # noqa: PLC0415

  cfg = presets.get(family, preset, vocab_size=vocab, dtype="bfloat16")
  _, _, _, tx, shardings = _train_setup(topology, cfg)
  grouping = layers.grouped_normal_draws
  if not grouped:  # models.build looks the context up when it runs
    layers.grouped_normal_draws = contextlib.nullcontext
  try:
    lowered = state_lib.initialiser(cfg, tx, shardings, seed=0).lower()
  finally:
    layers.grouped_normal_draws = grouping
  start = time.perf_counter()
  compiled = lowered.compile()
  seconds = time.perf_counter() - start
  return seconds, sum(k["calls"] for k in kernels(compiled.as_text())), temp_bytes(compiled)


def temp_bytes(compiled) -> int | None:
  """XLA's peak temporary allocation for the step (activations, gradients, workspace; not its
  arguments or outputs), or None where the compiler does not say."""
  try:
    return compiled.memory_analysis().temp_size_in_bytes
  except Exception:  # noqa: BLE001 (a backend without memory analysis)
    return None


def main() -> None:
  import gpu_check  # noqa: PLC0415 (benchmarks/gpu_check.py: shapes and variant names)

  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--target", choices=sorted(TARGETS), default="h200")
  parser.add_argument("--shapes", default="15m/32000",
                      help="train shapes as preset/vocab or preset (gpu_check's names)")
  parser.add_argument("--variants", default=gpu_check.TRAIN_VARIANTS,
                      help="comma-separated attention:loss[:options], as in gpu_check")
  parser.add_argument("--top", type=int, default=8, help="largest kernels listed")
  parser.add_argument("--out", default="", help="also write the rows to this JSONL file")
  parser.add_argument("--initialiser", action="store_true",
                      help="instead of the train step, time compiling each shape's state "
                           "initialiser, each parameter drawn alone and grouped (models.build)")
  args = parser.parse_args()
  wanted = gpu_check._names(args.shapes)  # noqa: SLF001
  shapes = [s for s in gpu_check.TRAIN_SHAPES if gpu_check._shape_wanted(s, wanted)]  # noqa: SLF001
  if not shapes:
    parser.error(f"no train shape matches --shapes={args.shapes!r}")
  try:
    variants = {text: gpu_check.parse_variant(text)
                for text in gpu_check._names(args.variants)}  # noqa: SLF001
  except ValueError as e:
    parser.error(f"--variants: {e}")
  topology = _setup_jax(args.target)
  rows = []
  for family, preset, vocab, batch, seq, _ in shapes:
    if args.initialiser:
      row = {"target": args.target, "model": f"{family}:{preset}", "vocab": vocab,
             "initialiser": True}
      for name, grouped in (("alone", False), ("grouped", True)):
        seconds, count, temp = compile_initialiser(topology, family, preset, vocab,
                                                   grouped=grouped)
        row.update({f"{name}_compile_s": round(seconds, 2), f"{name}_kernels": count,
                    f"{name}_temp_mb": None if temp is None else round(temp / 1e6, 1)})
      rows.append(row)
      print(f"{preset}/{vocab} initialiser compile: each parameter drawn alone "
            f"{row['alone_compile_s']:.2f} s ({row['alone_kernels']} kernels, "
            f"{row['alone_temp_mb']} MB temporary), grouped {row['grouped_compile_s']:.2f} s "
            f"({row['grouped_kernels']} kernels, {row['grouped_temp_mb']} MB temporary)",
            flush=True)
      continue
    for text, variant in sorted(variants.items()):
      if "pallas" in (variant["norm"], variant["qkv"], variant["mlp"]) and family != "llama":
        print(f"\n{preset}/{vocab} {text}: skipped, the norm and MLP kernels and stacked q/k/v "
              "are llama's")
        continue
      compiled = compile_step(topology, family, preset, vocab, batch, seq, variant)
      ks, temp = kernels(compiled.as_text()), temp_bytes(compiled)
      by_kind, read_by_kind = collections.Counter(), collections.Counter()
      for k in ks:
        by_kind[k["kind"]] += k["bytes"]
        read_by_kind[k["kind"]] += k["read_bytes"]
      total = sum(by_kind.values())
      read = sum(k["read_bytes"] for k in ks)
      row = {"target": args.target, "model": f"{family}:{preset}", "vocab": vocab,
             "batch": batch, "seq": seq, "variant": text,
             "kernels": sum(k["calls"] for k in ks),
             "temp_gb": None if temp is None else round(temp / 1e9, 3),
             "gb": round(total / 1e9, 3), "gb_sliced_as_read": round(read / 1e9, 3),
             "gb_by_kind": {k: round(v / 1e9, 3) for k, v in by_kind.most_common()},
             "gb_sliced_as_read_by_kind": {k: round(read_by_kind[k] / 1e9, 3)
                                           for k, _ in by_kind.most_common()}}
      rows.append(row)
      print(f"\n{preset}/{vocab} {text}: {row['kernels']} kernels, "
            f"operands + results {total / 1e9:.2f} GB; with sliced and gathered "
            f"operands counted at the part read, {read / 1e9:.2f} GB; peak temporary memory "
            + ("unknown" if temp is None else f"{temp / 1e9:.2f} GB"))
      for kind, b in by_kind.most_common():
        print(f"  {b / 1e9:8.2f} GB  {kind} ({read_by_kind[kind] / 1e9:.2f} GB as read)")
      for k in sorted(ks, key=lambda k: -k["bytes"])[:args.top]:
        loop = f" x{k['calls']}" if k["calls"] > 1 else ""
        print(f"  {k['bytes'] / 1e9:8.2f} GB  {k['name']}{loop} ({k['kind']}) -> "
              f"{k['result'][:48]}")
  if args.out:
    with open(args.out, "a") as f:
      for row in rows:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
  main()
