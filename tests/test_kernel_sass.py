"""benchmarks/kernel_sass.py: its SASS loop accounting, and argument errors before compiling."""

import subprocess
import sys

import script_loader

SCRIPT = script_loader.BENCHMARKS / "kernel_sass.py"


def _module():
  return script_loader.load("kernel_sass")


# The shape of an `nvdisasm -c` listing: a loop of five instructions (one predicated), a
# forward branch that is not a loop, and the end-of-kernel branch to itself.
SASS = """
        .text.flash_attention_fwd:
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   ISETP.GE.AND P0, PT, R2, R3, PT ;
        /*0020*/               @P0 BRA `(.L_x_2) ;
.L_x_1:
        /*0030*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR24], RZ, !UPT ;
        /*0040*/                   FFMA R4, R5, R6, -R7 ;
        /*0050*/                   MUFU.EX2 R4, R4 ;
        /*0060*/              @!P1 FMUL R8, R8, 0.5 ;
        /*0070*/               @P2 BRA `(.L_x_1) ;
.L_x_2:
        /*0080*/                   EXIT ;
.L_x_3:
        /*0090*/                   BRA `(.L_x_3);
"""


def test_sass_loops_counts_one_pass_of_each_loop():
  module = _module()
  loops = module.sass_loops(SASS)
  assert [(l["label"], l["instructions"]) for l in loops] == [(".L_x_1", 5)]
  assert {c: loops[0][c] for c in ("HGMMA", "FFMA", "MUFU", "FMUL", "FADD")} == {
      "HGMMA": 1, "FFMA": 1, "MUFU": 1, "FMUL": 1, "FADD": 0}
  assert module.sass_instructions(SASS) == 10


def test_bad_shapes_are_refused_before_compiling():
  for argv, says in ((["--attention=32x1024x8"], "expected 4 positive integers"),
                     (["--attention=", "--loss=8192x0"], "expected 2 positive integers"),
                     (["--attention="], "nothing to compile")):
    done = subprocess.run([sys.executable, str(SCRIPT), *argv], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2 and says in done.stderr, (argv, done.stderr)
