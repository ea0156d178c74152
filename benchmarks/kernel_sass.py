"""Instruction counts of the Pallas GPU kernels' loops, compiled for an H200 without a GPU.

    python benchmarks/kernel_sass.py --attention=32x1024x8x64 --loss=8192x32000
    python benchmarks/kernel_sass.py --attention=128x256x6x48 --jnpexp   # jnp's exponentials

Compiles the flash attention forward and backward (bf16, causal, default blocks) at
`--attention` B x T x H x D and the three loss kernels at `--loss` rows x vocab, with XLA's
deviceless GPU compiler (`gpu_compile.py`'s environment), has XLA write each kernel's PTX, and
for each kernel prints the registers a thread (`ptxas -v`) and, per loop of its SASS
(`nvdisasm`, PyPI's `nvidia-cuda-nvdisasm`), how many instructions the loop body holds (from its
label to the branch back; one pass, where the body has no inner branches, as in these kernels)
and how many of them are tensor-core products (HGMMA), exponentials (MUFU), fused multiply-adds,
plain multiplies, adds, min/max, selects and bf16 packs. These are static counts, not timings:
where a loop's time goes on a GPU is for a profiler there to say.

Needs ptxas (`nvidia-cuda-nvcc`, installed with `jax[cuda12]`) and nvdisasm, each on PATH, in an
installed NVIDIA wheel's `bin/` or given by `--ptxas` / `--nvdisasm`; the counts in
docs/kernels.md came from ptxas 12.9 and nvdisasm 13.5.
"""

from __future__ import annotations

import argparse
import collections
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

# SASS opcode classes reported per loop (the opcode before its first dot).
CLASSES = ("HGMMA", "MUFU", "FFMA", "FMUL", "FADD", "FMNMX", "FSEL", "F2FP")
_LABEL = re.compile(r"^\s*(\.L_x_\d+):")
_INSTRUCTION = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(.*?)\s*;")


def sass_instructions(sass: str) -> int:
  """How many instructions an `nvdisasm -c` listing holds."""
  return sum(1 for line in sass.splitlines() if _INSTRUCTION.search(line))


def sass_loops(sass: str) -> list[dict]:
  """Every loop of an `nvdisasm -c` listing (a label and a later branch back to it): its label,
  how many instructions its body holds, and their counts by opcode class (CLASSES)."""
  labels, instructions = {}, []
  for line in sass.splitlines():
    label = _LABEL.match(line)
    if label:
      labels[label.group(1)] = len(instructions)
      continue
    found = _INSTRUCTION.search(line)
    if found:
      instructions.append(found.group(1))
  loops = []
  for i, text in enumerate(instructions):
    target = re.search(r"\bBRA\b.*?(\.L_x_\d+)", text)
    if not target or target.group(1) not in labels or labels[target.group(1)] > i:
      continue
    body = instructions[labels[target.group(1)]:i + 1]
    if len(body) < 2:  # a branch to itself: the end-of-kernel trap, not a loop
      continue
    opcodes = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", b).split()[0].split(".")[0]
                                  for b in body)
    loops.append({"label": target.group(1), "instructions": len(body),
                  **{c: opcodes[c] for c in CLASSES}})
  return loops


def _tool(name: str, given: str) -> str:
  if given:
    if not os.access(given, os.X_OK):
      sys.exit(f"kernel_sass: --{name}={given} is not an executable file.")
    return given
  found = shutil.which(name)
  if found:
    return found
  try:  # the NVIDIA wheels: nvidia/cuda_nvcc/bin/ptxas (jax[cuda12]), nvidia/cu13/bin/nvdisasm
    import nvidia  # noqa: PLC0415
    for root in nvidia.__path__:
      for candidate in sorted(pathlib.Path(root).glob(f"*/bin/{name}")):
        if os.access(candidate, os.X_OK):
          return str(candidate)
  except ImportError:
    pass
  sys.exit(f"kernel_sass: no {name}; put it on PATH or pass --{name} (ptxas: pip install "
           f"nvidia-cuda-nvcc-cu12; nvdisasm: pip install nvidia-cuda-nvdisasm).")


def _run(argv: list[str]) -> subprocess.CompletedProcess:
  done = subprocess.run(argv, capture_output=True, text=True)
  if done.returncode:
    sys.exit(f"kernel_sass: {' '.join(argv)} failed ({done.returncode}):\n{done.stderr}")
  return done


def _shape(text: str, n: int, flag: str, parser) -> tuple[int, ...]:
  parts = text.lower().split("x")
  if len(parts) != n or not all(p.isdigit() and int(p) > 0 for p in parts):
    parser.error(f"--{flag}={text!r}: expected {n} positive integers joined by 'x'")
  return tuple(int(p) for p in parts)


def _compile(dump: pathlib.Path, attention, loss, jnpexp: bool) -> None:
  # The plugin's start-up check asks the (absent) driver for its version.
  os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
  os.environ.setdefault("CUDA_VISIBLE_DEVICES", "-1")
  os.environ["XLA_FLAGS"] = (f"{os.environ.get('XLA_FLAGS', '')} --xla_dump_to={dump} "
                             "--xla_gpu_dump_llvmir --xla_dump_emitter_re=.*").strip()
  import gpu_compile  # noqa: PLC0415 (imports jax: after XLA_FLAGS)
  topology = gpu_compile._setup_jax("h200")  # noqa: SLF001
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415

  from tinystories_jax.kernels import cross_entropy  # noqa: PLC0415
  from tinystories_jax.kernels import flash_attention as fa  # noqa: PLC0415
  mesh = jax.sharding.Mesh(np.asarray(topology.devices).reshape(1), ("x",))
  whole = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def arg(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=whole)

  with jax.set_mesh(mesh), fa.override_default_blocks(fast_exp2=not jnpexp):
    if attention:
      def attention_fwd_bwd(q, k, v):
        out, vjp = jax.vjp(lambda *a: fa.flash_attention(*a, causal=True, backend="gpu",
                                                         interpret=False), q, k, v)
        return vjp(out)
      x = arg(attention, jnp.bfloat16)
      jax.jit(attention_fwd_bwd).lower(x, x, x).compile()
    if loss:
      rows, vocab = loss

      def loss_kernels(logits, lse, targets):
        return (cross_entropy.logsumexp(logits, vocab, interpret=False),
                cross_entropy.logit_grad(logits, lse, lse, lse, targets, vocab,
                                         interpret=False),
                cross_entropy.softmax_minus_onehot(logits, targets, vocab, interpret=False))
      padded = -(-vocab // 128) * 128
      jax.jit(loss_kernels).lower(arg((1, rows, padded), jnp.bfloat16),
                                  arg((1, rows), jnp.float32),
                                  arg((1, rows), jnp.int32)).compile()


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--attention", default="32x1024x8x64",
                      help="BxTxHxD of the attention kernels ('' for none)")
  parser.add_argument("--loss", default="", help="ROWSxVOCAB of the loss kernels ('' for none)")
  parser.add_argument("--jnpexp", action="store_true",
                      help="the kernels with BlockSizes.fast_exp2 off (jnp's exponentials)")
  parser.add_argument("--ptxas", default="")
  parser.add_argument("--nvdisasm", default="")
  args = parser.parse_args()
  attention = _shape(args.attention, 4, "attention", parser) if args.attention else None
  loss = _shape(args.loss, 2, "loss", parser) if args.loss else None
  if not attention and not loss:
    parser.error("nothing to compile: give --attention and/or --loss")
  ptxas, nvdisasm = _tool("ptxas", args.ptxas), _tool("nvdisasm", args.nvdisasm)
  with tempfile.TemporaryDirectory() as tmp:
    dump = pathlib.Path(tmp)
    _compile(dump, attention, loss, args.jnpexp)
    shown = 0
    for ptx in sorted(dump.glob("*.ptx")):
      entries = re.findall(r"\.entry\s+(\w+)\(", ptx.read_text())
      ours = [e for e in entries if e.startswith(("flash_attention", "cross_entropy"))]
      if not ours:
        continue
      if len(entries) > 1:
        print(f"# {ptx.name} holds {len(entries)} kernels; the counts below are all of them")
      shown += 1
      cubin = ptx.with_suffix(".cubin")
      compiled = _run([ptxas, "-v", "-arch=sm_90a", str(ptx), "-o", str(cubin)])
      registers = re.search(r"Used (\d+) registers", compiled.stderr)
      spills = re.search(r"(\d+) bytes spill stores", compiled.stderr)
      sass = _run([nvdisasm, "-c", str(cubin)]).stdout
      print(f"{', '.join(ours)}: {registers.group(1) if registers else '?'} registers a thread, "
            f"{spills.group(1) if spills else '?'} bytes of spill stores")
      loops = sass_loops(sass)
      for loop in loops:
        counts = " ".join(f"{c} {loop[c]}" for c in CLASSES)
        print(f"  loop {loop['label']}: {loop['instructions']} instructions ({counts})")
      if not loops:
        print(f"  no loop: {sass_instructions(sass)} instructions in all")
    if not shown:
      sys.exit("kernel_sass: XLA wrote no PTX of the attention or loss kernels; nothing to count.")


if __name__ == "__main__":
  main()
