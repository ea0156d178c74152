"""mesh.cpu_devices: how many CPU devices a run asks JAX for."""

import os

import pytest

from tests.training.train_helpers import load_config
from tinystories_jax.training import config as config_lib
from tinystories_jax.training import loop


def _run(**overrides):
  c = load_config("quickstart")
  for key, value in overrides.items():
    section, name = key.split("__")
    c[section][name] = value
  return config_lib.run_config(c.to_dict())


def _cores():
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def test_auto_is_the_default_and_divides_the_batch():
  assert load_config("base").mesh.cpu_devices == -1
  for batch in (1, 2, 6, 7, 12, 64):
    n = loop.cpu_device_count(_run(train__batch_size=batch), env={})
    want = max(d for d in range(1, _cores() + 1) if batch % d == 0)
    assert n == (want if want > 1 else 0), batch
    assert n == 0 or batch % n == 0


def test_auto_leaves_explicit_meshes_flags_and_multi_process_runs_alone():
  run = _run(train__batch_size=64)
  flags = {"XLA_FLAGS": "--xla_force_host_platform_device_count=3"}
  assert loop.cpu_device_count(run, env=flags) == 0
  assert loop.cpu_device_count(run, single_process=False, env={}) == 0
  assert loop.cpu_device_count(_run(train__batch_size=64, mesh__fsdp=2), env={}) == 0
  assert loop.cpu_device_count(_run(mesh__cpu_devices=3), env={}) == 3
  assert loop.cpu_device_count(_run(mesh__cpu_devices=0), env={}) == 0


def test_a_negative_count_other_than_auto_is_refused():
  with pytest.raises(config_lib.ConfigError, match="mesh.cpu_devices must be -1"):
    config_lib.validate(_run(mesh__cpu_devices=-2))
