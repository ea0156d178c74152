"""benchmarks/gpu_compile.py: its HLO accounting, and argument errors before any compiling."""

import subprocess
import sys

import pytest

import script_loader

SCRIPT = script_loader.BENCHMARKS / "gpu_compile.py"


def _module():
  return script_loader.load("gpu_compile")


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


SLICED = """HloModule m

%fused_slice (param_0.1: bf16[64,3,128]) -> bf16[64,1,128] {
  %param_0.1 = bf16[64,3,128]{2,1,0} parameter(0)
  %bitcast.2 = bf16[64,3,128]{2,1,0} bitcast(%param_0.1)
  ROOT %slice.3 = bf16[64,1,128]{2,1,0} slice(%bitcast.2), slice={[0:64], [2:3], [0:128]}
}

%fused_add (param_0.4: bf16[64,3,128], param_1.5: f32[64]) -> bf16[64,3,128] {
  %param_0.4 = bf16[64,3,128]{2,1,0} parameter(0)
  %slice.6 = bf16[64,1,128]{2,1,0} slice(%param_0.4), slice={[0:64], [0:1], [0:128]}
  ROOT %add.7 = bf16[64,3,128]{2,1,0} add(%param_0.4, %param_0.4)
}

%fused_square (param_0.8: bf16[64,3,128]) -> bf16[64,1,128] {
  %param_0.8 = bf16[64,3,128]{2,1,0} parameter(0)
  %convert.9 = f32[64,3,128]{2,1,0} convert(%param_0.8)
  %multiply.10 = f32[64,3,128]{2,1,0} multiply(%convert.9, %convert.9)
  %slice.11 = f32[64,1,128]{2,1,0} slice(%multiply.10), slice={[0:64], [1:2], [0:128]}
  ROOT %convert.12 = bf16[64,1,128]{2,1,0} convert(%slice.11)
}

ENTRY %main (p0: bf16[64,3,128], p1: f32[64]) -> (bf16[64,1,128], bf16[64,3,128]) {
  %p0 = bf16[64,3,128]{2,1,0} parameter(0)
  %p1 = f32[64]{0} parameter(1)
  %loop_slice_fusion = bf16[64,1,128]{2,1,0} fusion(%p0), kind=kLoop, calls=%fused_slice
  %loop_add_fusion = bf16[64,3,128]{2,1,0} fusion(%p0, %p1), kind=kLoop, calls=%fused_add
  %loop_square_fusion = bf16[64,1,128]{2,1,0} fusion(%p0), kind=kLoop, calls=%fused_square
  ROOT %tuple = (bf16[64,1,128]{2,1,0}, bf16[64,3,128]{2,1,0}) tuple(%loop_slice_fusion, \
%loop_add_fusion)
}
"""


def test_sliced_operands_count_at_the_part_read():
  ks = {k["name"]: k for k in _module().kernels(SLICED)}
  third, whole = 64 * 128 * 2, 64 * 3 * 128 * 2
  assert ks["loop_slice_fusion"]["bytes"] == whole + third
  assert ks["loop_slice_fusion"]["read_bytes"] == third + third  # read a third, wrote it
  # Elementwise ops (same shape) before the slice: still only the slice's elements are read.
  assert ks["loop_square_fusion"]["read_bytes"] == third + third
  # Sliced and also read whole: the whole of it counts.
  assert ks["loop_add_fusion"]["read_bytes"] == ks["loop_add_fusion"]["bytes"] == 2 * whole + 256


@pytest.mark.parametrize("argv, says", [(["--shapes=99m"], "no train shape matches"),
                                        (["--variants=pallas:fused:bogus"], "'bogus'")])
def test_bad_arguments_stop_before_compiling(argv, says):
  proc = subprocess.run([sys.executable, str(SCRIPT), *argv], capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 2 and says in proc.stderr, proc.stderr


def test_temp_bytes_reads_the_compilers_memory_analysis():
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  module = _module()
  compiled = jax.jit(lambda x: jnp.sin(x) @ jnp.cos(x).T).lower(
      jax.ShapeDtypeStruct((256, 256), jnp.float32)).compile()
  assert module.temp_bytes(compiled) == compiled.memory_analysis().temp_size_in_bytes

  class NoAnalysis:
    def memory_analysis(self):
      raise NotImplementedError("no memory analysis here")

  assert module.temp_bytes(NoAnalysis()) is None


LOOP = """HloModule m

%fused_store (param_0.1: bf16[4,64,128], param_1.2: bf16[64,128], param_2.3: s32[]) -> \
bf16[4,64,128] {
  %param_0.1 = bf16[4,64,128]{2,1,0} parameter(0)
  %param_1.2 = bf16[64,128]{1,0} parameter(1)
  %convert.4 = f32[64,128]{1,0} convert(%param_1.2)
  %convert.5 = bf16[64,128]{1,0} convert(%convert.4)
  %bitcast.6 = bf16[1,64,128]{2,1,0} bitcast(%convert.5)
  %param_2.3 = s32[] parameter(2)
  %constant.7 = s32[] constant(0)
  ROOT %dynamic-update-slice.8 = bf16[4,64,128]{2,1,0} dynamic-update-slice(%param_0.1, \
%bitcast.6, %param_2.3, %constant.7, %constant.7)
}

%fused_load (param_0.9: bf16[4,64,128], param_1.10: s32[]) -> bf16[64,128] {
  %param_0.9 = bf16[4,64,128]{2,1,0} parameter(0)
  %param_1.10 = s32[] parameter(1)
  %constant.11 = s32[] constant(0)
  %dynamic-slice.12 = bf16[1,64,128]{2,1,0} dynamic-slice(%param_0.9, %param_1.10, \
%constant.11, %constant.11), dynamic_slice_sizes={1,64,128}
  ROOT %bitcast.13 = bf16[64,128]{1,0} bitcast(%dynamic-slice.12)
}

%body (param.14: (s32[], bf16[4,64,128], bf16[64,128])) -> (s32[], bf16[4,64,128], \
bf16[64,128]) {
  %param.14 = (s32[], bf16[4,64,128]{2,1,0}, bf16[64,128]{1,0}) parameter(0)
  %get-tuple-element.15 = s32[] get-tuple-element(%param.14), index=0
  %get-tuple-element.16 = bf16[4,64,128]{2,1,0} get-tuple-element(%param.14), index=1
  %get-tuple-element.17 = bf16[64,128]{1,0} get-tuple-element(%param.14), index=2
  %loop_dynamic_update_slice_fusion = bf16[4,64,128]{2,1,0} fusion(%get-tuple-element.16, \
%get-tuple-element.17, %get-tuple-element.15), kind=kLoop, calls=%fused_store
  %loop_dynamic_slice_fusion = bf16[64,128]{1,0} fusion(%loop_dynamic_update_slice_fusion, \
%get-tuple-element.15), kind=kLoop, calls=%fused_load
  ROOT %tuple.18 = (s32[], bf16[4,64,128]{2,1,0}, bf16[64,128]{1,0}) tuple(\
%get-tuple-element.15, %loop_dynamic_update_slice_fusion, %loop_dynamic_slice_fusion)
}

%cond (param.19: (s32[], bf16[4,64,128], bf16[64,128])) -> pred[] {
  %param.19 = (s32[], bf16[4,64,128]{2,1,0}, bf16[64,128]{1,0}) parameter(0)
  ROOT %constant.20 = pred[] constant(false)
}

ENTRY %main (p0: (s32[], bf16[4,64,128], bf16[64,128])) -> (s32[], bf16[4,64,128], \
bf16[64,128]) {
  %p0 = (s32[], bf16[4,64,128]{2,1,0}, bf16[64,128]{1,0}) parameter(0)
  ROOT %while.21 = (s32[], bf16[4,64,128]{2,1,0}, bf16[64,128]{1,0}) while(%p0), \
condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"4"}}
}
"""


def test_loop_bodies_count_once_per_trip_and_in_place_updates_count_the_slice():
  ks = {k["name"]: k for k in _module().kernels(LOOP)}
  assert sorted(ks) == ["loop_dynamic_slice_fusion", "loop_dynamic_update_slice_fusion"]
  layer, calls = 64 * 128 * 2, 4
  store, load = ks["loop_dynamic_update_slice_fusion"], ks["loop_dynamic_slice_fusion"]
  assert store["calls"] == load["calls"] == calls
  # The store reads one layer's values and writes them into the stack: not the whole stack.
  assert store["bytes"] == store["read_bytes"] == calls * (layer + layer + 4)
  # The load reads one layer out of the stack (read_bytes) and writes it.
  assert load["read_bytes"] == calls * (layer + layer + 4)
  assert load["bytes"] == calls * (4 * layer + layer + 4)


UPDATES = """HloModule m

%fused_two (param_0.1: f32[8], param_1.2: f32[8], param_2.3: f32[8], param_3.4: f32[8], \
param_4.5: f32[8], param_5.6: bf16[4,64,128], param_6.7: bf16[64,128], param_7.8: s32[], \
param_8.9: bf16[4,64,128]) -> (bf16[4,64,128], bf16[4,64,128], f32[8]) {
  %param_0.1 = f32[8]{0} parameter(0)
  %param_1.2 = f32[8]{0} parameter(1)
  %param_2.3 = f32[8]{0} parameter(2)
  %param_3.4 = f32[8]{0} parameter(3)
  %param_4.5 = f32[8]{0} parameter(4)
  %add.10 = f32[8]{0} add(%param_0.1, %param_1.2)
  %add.11 = f32[8]{0} add(%param_2.3, %param_3.4)
  %add.12 = f32[8]{0} add(%add.10, %add.11)
  %add.13 = f32[8]{0} add(%add.12, %param_4.5)
  %param_5.6 = bf16[4,64,128]{2,1,0} parameter(5)
  %param_6.7 = bf16[64,128]{1,0} parameter(6)
  %bitcast.14 = bf16[1,64,128]{2,1,0} bitcast(%param_6.7)
  %param_7.8 = s32[] parameter(7)
  %constant.15 = s32[] constant(0)
  %dynamic-update-slice.16 = bf16[4,64,128]{2,1,0} dynamic-update-slice(%param_5.6, \
%bitcast.14, %param_7.8, %constant.15, %constant.15)
  %param_8.9 = bf16[4,64,128]{2,1,0} parameter(8)
  %bitcast.17 = bf16[256,128]{1,0} bitcast(%param_8.9)
  %bitcast.18 = bf16[4,64,128]{2,1,0} bitcast(%bitcast.17)
  %dynamic-update-slice.19 = bf16[4,64,128]{2,1,0} dynamic-update-slice(%bitcast.18, \
%bitcast.14, %param_7.8, %constant.15, %constant.15)
  %bitcast.20 = bf16[4,64,128]{2,1,0} bitcast(%dynamic-update-slice.19)
  ROOT %tuple.21 = (bf16[4,64,128]{2,1,0}, bf16[4,64,128]{2,1,0}, f32[8]{0}) \
tuple(%dynamic-update-slice.16, %bitcast.20, %add.13)
}

%fused_not_returned (param_0.22: bf16[4,64,128], param_1.23: bf16[1,64,128], param_2.24: s32[]) \
-> bf16[4,64,128] {
  %param_0.22 = bf16[4,64,128]{2,1,0} parameter(0)
  %param_1.23 = bf16[1,64,128]{2,1,0} parameter(1)
  %param_2.24 = s32[] parameter(2)
  %constant.25 = s32[] constant(0)
  %dynamic-update-slice.26 = bf16[4,64,128]{2,1,0} dynamic-update-slice(%param_0.22, \
%param_1.23, %param_2.24, %constant.25, %constant.25)
  ROOT %multiply.27 = bf16[4,64,128]{2,1,0} multiply(%dynamic-update-slice.26, \
%dynamic-update-slice.26)
}

%fused_on_zeros (param_0.28: bf16[1,64,128], param_1.29: s32[]) -> bf16[4,64,128] {
  %param_0.28 = bf16[1,64,128]{2,1,0} parameter(0)
  %param_1.29 = s32[] parameter(1)
  %constant.30 = bf16[] constant(0)
  %broadcast.31 = bf16[4,64,128]{2,1,0} broadcast(%constant.30), dimensions={}
  %constant.32 = s32[] constant(0)
  ROOT %dynamic-update-slice.33 = bf16[4,64,128]{2,1,0} dynamic-update-slice(%broadcast.31, \
%param_0.28, %param_1.29, %constant.32, %constant.32)
}

%inner (param.34: (s32[], bf16[1,64,128])) -> (s32[], bf16[1,64,128]) {
  %param.34 = (s32[], bf16[1,64,128]{2,1,0}) parameter(0)
  %get-tuple-element.35 = s32[] get-tuple-element(%param.34), index=0
  %get-tuple-element.36 = bf16[1,64,128]{2,1,0} get-tuple-element(%param.34), index=1
  %loop_on_zeros_fusion = bf16[4,64,128]{2,1,0} fusion(%get-tuple-element.36, \
%get-tuple-element.35), kind=kLoop, calls=%fused_on_zeros
  ROOT %tuple.37 = (s32[], bf16[1,64,128]{2,1,0}) tuple(%get-tuple-element.35, \
%get-tuple-element.36)
}

%outer (param.38: (s32[], bf16[1,64,128])) -> (s32[], bf16[1,64,128]) {
  %param.38 = (s32[], bf16[1,64,128]{2,1,0}) parameter(0)
  %while.39 = (s32[], bf16[1,64,128]{2,1,0}) while(%param.38), condition=%cond, body=%inner, \
backend_config={"known_trip_count":{"n":"3"}}
  ROOT %while.40 = (s32[], bf16[1,64,128]{2,1,0}) while(%while.39), condition=%cond, \
body=%inner
}

%cond (param.41: (s32[], bf16[1,64,128])) -> pred[] {
  %param.41 = (s32[], bf16[1,64,128]{2,1,0}) parameter(0)
  ROOT %constant.42 = pred[] constant(false)
}

ENTRY %main (p0: f32[8], p1: bf16[4,64,128], p2: bf16[64,128], p3: s32[], \
p4: bf16[1,64,128], p5: (s32[], bf16[1,64,128])) -> (s32[], bf16[1,64,128]) {
  %p0 = f32[8]{0} parameter(0)
  %p1 = bf16[4,64,128]{2,1,0} parameter(1)
  %p2 = bf16[64,128]{1,0} parameter(2)
  %p3 = s32[] parameter(3)
  %p4 = bf16[1,64,128]{2,1,0} parameter(4)
  %p5 = (s32[], bf16[1,64,128]{2,1,0}) parameter(5)
  %loop_two_fusion = (bf16[4,64,128]{2,1,0}, bf16[4,64,128]{2,1,0}, f32[8]{0}) fusion(%p0, \
%p0, %p0, %p0, %p0, /*index=5*/%p1, %p2, %p3, %p1), kind=kLoop, calls=%fused_two
  %loop_not_returned_fusion = bf16[4,64,128]{2,1,0} fusion(%p1, %p4, %p3), kind=kLoop, \
calls=%fused_not_returned
  ROOT %while.43 = (s32[], bf16[1,64,128]{2,1,0}) while(%p5), condition=%cond, body=%outer, \
backend_config={"known_trip_count":{"n":"2"}}
}
"""


def test_only_updates_returned_into_a_parameter_count_as_in_place():
  found = _module().kernels(UPDATES)
  ks = {k["name"]: k for k in found}
  stack, layer, small = 4 * 64 * 128 * 2, 64 * 128 * 2, 8 * 4
  # Two updates returned in a tuple (one through bitcasts, its buffer too), and the operands
  # after the /*index=5*/ comment counted: the stacks are neither read nor written whole.
  two = ks["loop_two_fusion"]
  assert two["bytes"] == two["read_bytes"] == 5 * small + layer + 4 + (2 * layer + small)
  # An update that is not returned: its buffer is read whole and the result written whole.
  kept = ks["loop_not_returned_fusion"]
  assert kept["read_bytes"] == stack + layer + 4 + stack
  # An update of a buffer the fusion makes (zeros): the whole result is written. The inner
  # loop runs twice in an outer loop of 2 trips: 3 trips, then without a trip count (once).
  zeros = [k for k in found if k["name"] == "loop_on_zeros_fusion"]
  assert [k["calls"] for k in zeros] == [2 * 3, 2 * 1]
  for k in zeros:
    assert k["read_bytes"] == k["calls"] * (layer + 4 + stack)
