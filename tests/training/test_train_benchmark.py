"""The throughput function the benchmarks share returns sane figures for the real step."""

import jax

from tinystories_jax.models.config import ModelConfig, count_flops_per_token
from tinystories_jax.parallel.mesh import MeshConfig
from tinystories_jax.training.benchmark import measure_train_throughput


def test_measure_train_throughput_on_a_tiny_model():
  cfg = ModelConfig(family="gpt_neo", vocab_size=96, d_model=32, num_layers=2, num_heads=4,
                    max_positions=32, window=8, attention_impl="reference")
  r = measure_train_throughput(cfg, batch_size=8, seq_len=16, steps=2, warmup=1,
                               mesh_config=MeshConfig(1, 1, 1), devices=jax.devices()[:1])
  assert r["params"] > 0 and r["tokens_per_s"] > 0 and r["step_ms"] > 0
  assert 3.0 < r["loss"] < 6.0  # about ln(96) = 4.56 at initialisation
  expected = r["tokens_per_s"] * count_flops_per_token(cfg, 16) / 1e12
  assert abs(r["model_tflops"] - expected) <= 1e-12 + 1e-9 * expected
  assert r["batch_size"] == 8 and r["seq_len"] == 16 and r["devices"] == 1
  assert 0 < r["init_s"] and 0 < r["compile_s"]


def _profile_summary():
  import importlib.util  # noqa: PLC0415
  import pathlib  # noqa: PLC0415
  path = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "profile_summary.py"
  spec = importlib.util.spec_from_file_location("profile_summary", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_trace_dir_writes_a_trace_the_summary_reads(tmp_path):
  cfg = ModelConfig(family="llama", vocab_size=64, d_model=16, num_layers=1, num_heads=2,
                    max_positions=16, attention_impl="reference")
  measure_train_throughput(cfg, batch_size=2, seq_len=8, steps=1, warmup=1,
                           mesh_config=MeshConfig(1, 1, 1), devices=jax.devices()[:1],
                           trace_dir=str(tmp_path / "run"), trace_steps=2)
  summary = _profile_summary()
  traces = summary.find_traces([str(tmp_path)], tmp_path / "scratch")
  assert list(traces) == ["run"]
  assert "ENTRY" in (tmp_path / "run" / "step_hlo.txt").read_text()
  if jax.default_backend() == "cpu":
    assert summary.device_events(traces["run"]) == []


def test_profile_summary_of_a_gpu_trace(tmp_path):
  import gzip  # noqa: PLC0415
  import json  # noqa: PLC0415
  events = [
      {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
      {"ph": "M", "name": "process_name", "pid": 7, "args": {"name": "/host:CPU"}},
      {"ph": "X", "pid": 1, "ts": 0.0, "dur": 600.0, "name": "nvjet_sm90_tst_176x128_TNN"},
      {"ph": "X", "pid": 1, "ts": 700.0, "dur": 300.0, "name": "gemm_fusion_dot_33"},
      {"ph": "X", "pid": 1, "ts": 1000.0, "dur": 100.0, "name": "flash_attention_fwd"},
      {"ph": "X", "pid": 1, "ts": 1200.0, "dur": 200.0, "name": "input_reduce_fusion_13"},
      {"ph": "X", "pid": 7, "ts": 0.0, "dur": 5000.0, "name": "host work"},
  ]
  trace = tmp_path / "v" / "plugins" / "profile" / "t" / "host.trace.json.gz"
  trace.parent.mkdir(parents=True)
  with gzip.open(trace, "wt") as f:
    json.dump({"traceEvents": events}, f)
  summary = _profile_summary()
  traces = summary.find_traces([str(tmp_path)], tmp_path / "scratch")
  gpu = summary.device_events(traces["v"])
  assert len(gpu) == 4  # the host event is not device time
  text = summary.summarize("v", gpu, steps=2, top=3)
  assert "GPU busy 0.60 ms per step" in text and "first to last kernel 0.70 ms" in text
  assert "| matmul (cuBLAS) | 0.300 | 50.0% |" in text
  assert "matmul (XLA Triton GEMM) | 0.150" in text
  assert "attention (our Pallas kernels) | 0.050" in text


def test_profile_summary_keeps_traces_of_the_same_name_apart(tmp_path):
  import gzip  # noqa: PLC0415
  import json  # noqa: PLC0415
  import tarfile  # noqa: PLC0415
  archives = []
  for i in range(2):
    trace = tmp_path / f"src{i}" / "33m-fused" / "plugins" / "profile" / f"t{i}" / "h.trace.json.gz"
    trace.parent.mkdir(parents=True)
    with gzip.open(trace, "wt") as f:
      json.dump({"traceEvents": []}, f)
    archive = tmp_path / f"call{i}" / "profiles.tar.gz"  # the same file name from every call
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
      tar.add(tmp_path / f"src{i}" / "33m-fused", arcname="profile/33m-fused")
    archives.append(str(archive))
  traces = _profile_summary().find_traces(archives, tmp_path / "scratch")
  assert len(traces) == 2
  assert all(name.startswith("33m-fused [") for name in traces)
  assert {p.parent.name for p in traces.values()} == {"t0", "t1"}
