"""The offline demo: a 0.3M-parameter llama on the synthetic corpus, a few minutes on two CPU cores.

  python -m tinystories_jax.prepare --input=synthetic --output_dir=runs/quickstart-data \\
      --vocab_size=1024
  python -m tinystories_jax.train --config=configs/quickstart.py --workdir=runs/quickstart

Expected: the training loss falls from about 6.9 (ln 1024) to about 1 within 150 steps (1.8 at
step 100, 1.1 at step 125 in a measured run) and the validation bits per byte follow; config.json,
metrics.jsonl, TensorBoard events and checkpoints land in runs/quickstart. Rerunning the command
resumes (and stops at once when finished).
"""

import importlib.util
import pathlib


def _base():
  # Loaded by path so the config works from any working directory and from an installed package.
  path = pathlib.Path(__file__).with_name("base.py")
  spec = importlib.util.spec_from_file_location("tinystories_configs_base", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config():
  c = _base().get_config()
  c.data.dir = "runs/quickstart-data"
  c.model.family = "llama"
  c.model.name = "260k"       # d 64, 5 layers, 8 heads / 4 kv heads: 0.29M parameters at vocab 1024
  c.model.attention = "auto"
  c.train.steps = 300
  c.train.batch_size = 32
  c.train.seq_len = 128
  c.train.log_every = 25
  c.train.eval_every = 100
  c.train.eval_batches = 8
  c.train.checkpoint_every = 100
  c.optimizer.lr = 3e-3       # a tiny model on an easy corpus tolerates a large step
  c.optimizer.schedule = "cosine"
  c.optimizer.warmup_steps = 50
  c.optimizer.final_lr_ratio = 0.1
  c.optimizer.clip_norm = 1.0
  return c
