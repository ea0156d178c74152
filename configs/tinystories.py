"""The paper's seven GPT-Neo models with the released model cards' recipe.

  python -m tinystories_jax.prepare \\
      --input=hf://roneneldan/TinyStories/TinyStoriesV2-GPT4-train.txt \\
      --valid_input=hf://roneneldan/TinyStories/TinyStoriesV2-GPT4-valid.txt \\
      --output_dir=runs/tinystories-data --vocab_size=10000
  python -m tinystories_jax.train --config=configs/tinystories.py:33m --workdir=runs/33m \\
      --config.data.dir=runs/tinystories-data

Names: 1m, 3m, 8m, 28m, 33m, 1layer-21m, 2layers-33m. Recipe (TinyStories model cards): AdamW,
learning rate 5e-4 constant, weight decay 0.1, betas 0.9 / 0.95, context 512, batch 80 sequences
with 16 accumulation steps (1280 sequences, 655K tokens per step). Measured throughput is in
benchmarks/results/ (hf:// inputs need `pip install 'tinystories-jax[hf]'` and the network).
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

NAMES = ("1m", "3m", "8m", "28m", "33m", "1layer-21m", "2layers-33m")


def get_config(name: str = "33m"):
  if name not in NAMES:
    raise ValueError(f"Unknown TinyStories model {name!r}; choose one of {', '.join(NAMES)} "
                     "(configs/tinystories.py:<name>).")
  c = _base().get_config()
  c.data.dir = "runs/tinystories-data"
  c.model.family = "gpt_neo"
  c.model.name = name
  c.model.dtype = "bfloat16"
  c.train.steps = 20000
  c.train.batch_size = 80
  c.train.grad_accum_steps = 16
  c.train.seq_len = 512
  c.train.log_every = 50
  c.train.eval_every = 1000
  c.train.eval_batches = 50
  c.train.checkpoint_every = 1000
  c.optimizer.lr = 5e-4
  c.optimizer.schedule = "constant"
  c.optimizer.warmup_steps = 0
  c.optimizer.weight_decay = 0.1
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.95
  c.optimizer.clip_norm = 0.0
  return c
