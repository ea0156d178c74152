"""benchmarks/gpu_compile.py: its HLO accounting, and argument errors before any compiling."""

import importlib.util
import pathlib
import subprocess
import sys

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_compile.py"


def _module():
  spec = importlib.util.spec_from_file_location("gpu_compile", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_shape_bytes():
  shape_bytes = _module().shape_bytes
  assert shape_bytes("bf16[32768,32000]{1,0}") == 32768 * 32000 * 2
  assert shape_bytes("(f32[128,256]{1,0}, s32[4], pred[])") == 128 * 256 * 4 + 16 + 1


HLO = """HloModule m

ENTRY %main (p0: bf16[64,128], p1: bf16[128,256]) -> (bf16[64,256], f32[64]) {
  %p0 = bf16[64,128]{1,0} parameter(0)
  %p1 = bf16[128,256]{1,0} parameter(1)
  %gemm_fusion_dot.1 = bf16[64,256]{1,0} fusion(%p0, %p1), kind=kCustom, calls=%g, \
backend_config={"fusion_backend_config":{"kind":"__triton_nested_gemm_fusion"}}
  %pallas_call.2 = f32[64]{0} custom-call(%gemm_fusion_dot.1), \
custom_call_target="__gpu$xla.gpu.triton"
  %loop_exp_fusion = bf16[64,256]{1,0} fusion(%gemm_fusion_dot.1), kind=kLoop, calls=%e
  ROOT %tuple = (bf16[64,256]{1,0}, f32[64]{0}) tuple(%loop_exp_fusion, %pallas_call.2)
}
"""


def test_kernels_are_classified_and_counted():
  ks = {k["name"]: k for k in _module().kernels(HLO)}
  assert sorted(ks) == ["gemm_fusion_dot.1", "loop_exp_fusion", "pallas_call.2"]
  out = 64 * 256 * 2
  assert ks["gemm_fusion_dot.1"]["kind"] == "matmul"
  assert ks["gemm_fusion_dot.1"]["bytes"] == 64 * 128 * 2 + 128 * 256 * 2 + out
  assert ks["pallas_call.2"]["kind"] == "Pallas (Triton)"
  assert ks["pallas_call.2"]["bytes"] == out + 64 * 4
  assert ks["loop_exp_fusion"]["kind"] == "XLA fusion"
  assert ks["loop_exp_fusion"]["bytes"] == 2 * out


@pytest.mark.parametrize("argv, says", [(["--shapes=99m"], "no train shape matches"),
                                        (["--variants=pallas:fused:bogus"], "'bogus'")])
def test_bad_arguments_stop_before_compiling(argv, says):
  proc = subprocess.run([sys.executable, str(SCRIPT), *argv], capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 2 and says in proc.stderr, proc.stderr
