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
