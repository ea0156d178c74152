"""llama2.c-shaped models with llama2.c's training recipe.

  python -m tinystories_jax.prepare \\
      --input=hf://roneneldan/TinyStories/TinyStoriesV2-GPT4-train.txt \\
      --valid_input=hf://roneneldan/TinyStories/TinyStoriesV2-GPT4-valid.txt \\
      --output_dir=runs/llama-data --vocab_size=4096
  python -m tinystories_jax.train --config=configs/llama.py:15m --workdir=runs/llama-15m \\
      --config.data.dir=runs/llama-data

Names: 260k, 15m, 42m, 110m. Recipe (llama2.c train.py): AdamW, learning rate 5e-4 with 1000
warmup steps and cosine decay to 0, global-norm clip 1.0, betas 0.9 / 0.95, weight decay 0.1.
Batch, context and step counts follow llama2.c's published runs of each size.
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

# name: (batch_size, grad_accum_steps, seq_len, steps, lr)
RUNS = {
    "260k": (128, 1, 512, 20000, 5e-4),
    "15m": (128, 4, 256, 100000, 5e-4),
    "42m": (64, 8, 1024, 100000, 5e-4),
    "110m": (32, 16, 1024, 100000, 3e-4),
}


def get_config(name: str = "15m"):
  if name not in RUNS:
    raise ValueError(f"Unknown llama model {name!r}; choose one of {', '.join(RUNS)} "
                     "(configs/llama.py:<name>).")
  batch, accum, seq_len, steps, lr = RUNS[name]
  c = _base().get_config()
  c.data.dir = "runs/llama-data"
  c.model.family = "llama"
  c.model.name = name
  c.model.dtype = "float32" if name == "260k" else "bfloat16"
  c.train.steps = steps
  c.train.batch_size = batch
  c.train.grad_accum_steps = accum
  c.train.seq_len = seq_len
  c.train.log_every = 50
  c.train.eval_every = 2000
  c.train.eval_batches = 100
  c.train.checkpoint_every = 2000
  c.optimizer.lr = lr
  c.optimizer.schedule = "cosine"
  c.optimizer.warmup_steps = 1000
  c.optimizer.final_lr_ratio = 0.0
  c.optimizer.weight_decay = 0.1
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.95
  c.optimizer.clip_norm = 1.0
  return c
