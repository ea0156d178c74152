"""Helpers shared by the training tests: config loading and tiny run overrides."""

import importlib.util
import pathlib
import tempfile

REPO = pathlib.Path(__file__).resolve().parents[2]
# One persistent compilation cache for this test session and the subprocesses it starts.
CACHE_DIR = tempfile.mkdtemp(prefix="tinystories-test-xla-cache-")


def load_config(name: str, arg: str | None = None):
  """Runs configs/<name>.py's get_config (what --config=configs/<name>.py[:arg] does)."""
  spec = importlib.util.spec_from_file_location(f"test_config_{name}", REPO / "configs" /
                                                f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def tiny_overrides(data_dir, **extra) -> list[str]:
  """Command-line overrides for a seconds-long run of the quickstart config."""
  flags = {
      "data.dir": str(data_dir), "train.steps": 24, "train.batch_size": 8, "train.seq_len": 32,
      "train.log_every": 4, "train.eval_every": 12, "train.eval_batches": 2,
      "train.checkpoint_every": 6, "train.progress_bar": False, "optimizer.warmup_steps": 4,
      "optimizer.lr": 1e-2,
  }
  flags.update(extra)
  return [f"--config.{k}={v}" for k, v in flags.items()]


def tiny_config(data_dir, **extra):
  """The same tiny run as a ConfigDict (for in-process tests)."""
  c = load_config("quickstart")
  for arg in tiny_overrides(data_dir, **extra):
    key, value = arg[len("--config."):].split("=", 1)
    section, name = key.split(".")
    current = c[section][name]
    c[section][name] = type(current)(value) if not isinstance(current, bool) else (
        value.lower() == "true")
  return c


def cli_env(**extra) -> dict:
  """Environment for a `python -m tinystories_jax.train` subprocess: CPU only, quiet."""
  import os  # pylint: disable=import-outside-toplevel
  env = dict(os.environ)
  env.update(JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(REPO))
  env.pop("XLA_FLAGS", None)
  env["JAX_COMPILATION_CACHE_DIR"] = CACHE_DIR
  env.update(extra)
  return env


def train_cmd(workdir, overrides, config="configs/quickstart.py") -> list[str]:
  import sys  # pylint: disable=import-outside-toplevel
  return [sys.executable, "-m", "tinystories_jax.train", f"--config={REPO / config}",
          f"--workdir={workdir}", *overrides]
