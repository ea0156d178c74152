"""Every config file loads, validates, and names a model that exists."""

import importlib.util
import pathlib

import pytest

from tinystories_jax.models import presets
from tinystories_jax.training import config as config_lib

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


def _load(name):
  spec = importlib.util.spec_from_file_location(f"cfg_{name}", CONFIGS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _cases():
  yield "base", None
  yield "quickstart", None
  for name in _load("tinystories").NAMES:
    yield "tinystories", name
  for name in _load("llama").RUNS:
    yield "llama", name


@pytest.mark.parametrize("file, arg", list(_cases()))
def test_config_loads_and_resolves(file, arg):
  module = _load(file)
  config = module.get_config(arg) if arg else module.get_config()
  assert module.__doc__ and "python -m tinystories_jax.train" in module.__doc__
  run = config_lib.run_config(config)
  maker = {"llama": presets.llama, "gpt_neo": presets.gpt_neo}[run.model.family]
  model = maker(run.model.name, vocab_size=4096)
  assert model.max_positions >= run.train.seq_len
  for key in ("data.dir", "model.name", "model.attention", "train.steps", "train.batch_size",
              "train.seq_len", "train.eval_every", "train.checkpoint_every", "train.log_every",
              "train.seed", "mesh.data", "mesh.fsdp", "mesh.tensor"):
    section, name = key.split(".")
    assert name in config[section], key


def test_recipes_match_the_published_ones():
  ts = _load("tinystories").get_config("33m")
  assert (ts.optimizer.lr, ts.optimizer.schedule, ts.optimizer.weight_decay) == (
      5e-4, "constant", 0.1)
  assert (ts.optimizer.b1, ts.optimizer.b2, ts.train.seq_len) == (0.9, 0.95, 512)
  assert ts.train.batch_size * ts.train.grad_accum_steps == 80 * 16
  ll = _load("llama").get_config("15m")
  assert (ll.optimizer.lr, ll.optimizer.warmup_steps, ll.optimizer.schedule) == (
      5e-4, 1000, "cosine")
  assert (ll.optimizer.final_lr_ratio, ll.optimizer.clip_norm, ll.optimizer.weight_decay) == (
      0.0, 1.0, 0.1)


def test_unknown_names_are_rejected():
  with pytest.raises(ValueError, match="choose one of"):
    _load("tinystories").get_config("99m")
  with pytest.raises(ValueError, match="choose one of"):
    _load("llama").get_config("7b")


def test_every_base_key_has_a_comment():
  lines = (CONFIGS / "base.py").read_text().splitlines()
  keys = [l for l in lines if l.strip().startswith("c.") and "=" in l
          and "ConfigDict()" not in l]
  assert keys and all("#" in l for l in keys)
