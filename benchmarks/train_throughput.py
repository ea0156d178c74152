"""Steady-state training throughput of the real train step, optionally beside `transformers`.

  python benchmarks/train_throughput.py --config=configs/llama.py:260k --batch_size=32 \\
      --seq_len=256 --peer=transformers
  python benchmarks/train_throughput.py --config=configs/tinystories.py:33m --batch_size=64 \\
      --peer=transformers --output=benchmarks/results/train_throughput.jsonl

Prints one JSON line per system: tokens/s, step time, model TFLOP/s (PaLM count: 6 x params
without the embedding lookup + 12 x layers x d x T) on random tokens. The JAX figure times
`tinystories_jax.training.benchmark.measure_train_throughput` (forward, backward, global-norm
clip, AdamW, the config's `train.loss`: fused by default). `--peer=transformers` times the
matching `LlamaForCausalLM` (with `torch.compile`) or `GPTNeoForCausalLM` (eager and compiled)
at the same shape with `torch.optim.AdamW` and `clip_grad_norm_`, in the same process, so the
two figures share the machine's state. The vocabulary is `--vocab_size` (default: the
llama2.c/TinyStories presets' usual 512 for 260k, else 4096) since no data directory is needed.
"""

import json
import os
import pathlib
import sys
import time

from absl import app, flags
from ml_collections import config_flags

# Runs from a checkout without installing the package.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run configuration (configs/*.py).",
                                          lock_config=True)
_BATCH = flags.DEFINE_integer("batch_size", None, "Sequences per step (default: the config's "
                              "batch_size x grad_accum_steps).")
_SEQ = flags.DEFINE_integer("seq_len", None, "Tokens per sequence (default: the config's).")
_VOCAB = flags.DEFINE_integer("vocab_size", None, "Vocabulary size of the random tokens.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps first (the first compiles).")
_LOSS = flags.DEFINE_enum("loss", None, ["plain", "chunked", "fused"],
                          "Output loss (default: config's).")
_PEER = flags.DEFINE_enum("peer", None, ["transformers"], "Also time this peer implementation.")
_OUTPUT = flags.DEFINE_string("output", None, "Append the JSON lines to this file too.")
flags.mark_flags_as_required(["config"])


def _emit(row: dict) -> None:
  line = json.dumps(row)
  print(line, flush=True)
  if _OUTPUT.value:
    with open(_OUTPUT.value, "a") as f:
      f.write(line + "\n")


def _torch_peer(model_cfg, *, batch_size: int, seq_len: int, steps: int, warmup: int,
                compiled: bool) -> dict:
  """Times transformers' model of the same shape: forward, backward, clip, AdamW."""
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  from tinystories_jax.models import config as model_config  # pylint: disable=g-import-not-at-top

  torch.manual_seed(0)
  device = "cuda" if torch.cuda.is_available() else "cpu"
  c = model_cfg
  if c.family == "llama":
    hf = transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.d_ff,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
        num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim,
        max_position_embeddings=max(c.max_positions, seq_len), rms_norm_eps=c.norm_eps,
        rope_theta=c.rope_theta, tie_word_embeddings=c.tie_embeddings,
        attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(hf)
  else:
    hf = transformers.GPTNeoConfig(
        vocab_size=c.vocab_size, hidden_size=c.d_model, num_layers=c.num_layers,
        num_heads=c.num_heads, intermediate_size=c.d_ff, window_size=c.window,
        max_position_embeddings=max(c.max_positions, seq_len),
        attention_types=[[list(c.attention_layers), 1]], layer_norm_epsilon=c.norm_eps,
        embed_dropout=0.0, attention_dropout=0.0, resid_dropout=0.0)
    model = transformers.GPTNeoForCausalLM(hf)
  dtype = torch.bfloat16 if c.dtype == "bfloat16" and device == "cuda" else None
  model.to(device).train()
  params = sum(p.numel() for p in model.parameters())
  opt = torch.optim.AdamW(model.parameters(), lr=5e-4, betas=(0.9, 0.95), weight_decay=0.1)
  forward = torch.compile(model) if compiled else model

  def step(tokens):
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    with torch.autocast(device, dtype=dtype, enabled=dtype is not None):
      logits = forward(input_ids=inputs).logits
    loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, c.vocab_size),
                                             targets.reshape(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss

  gen = torch.Generator().manual_seed(0)
  batches = [torch.randint(0, c.vocab_size, (batch_size, seq_len + 1), generator=gen).to(device)
             for _ in range(2)]
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  t0 = time.perf_counter()
  for i in range(warmup):
    loss = step(batches[i % 2])
  sync()
  warmup_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  for i in range(steps):
    loss = step(batches[i % 2])
  sync()
  elapsed = time.perf_counter() - t0
  tok_s = steps * batch_size * seq_len / elapsed
  return {"tokens_per_s": tok_s, "step_ms": 1e3 * elapsed / steps,
          "model_tflops": tok_s * model_config.count_flops_per_token(c, seq_len) / 1e12,
          "params": params,
          "loss": float(loss.detach()), "warmup_s": warmup_s, "device": device,
          "threads": torch.get_num_threads(), "torch": torch.__version__,
          "transformers": transformers.__version__}


def main(argv):
  del argv
  from tinystories_jax.training import config as config_lib  # pylint: disable=g-import-not-at-top
  from tinystories_jax.training import loop  # pylint: disable=g-import-not-at-top
  try:
    run = config_lib.run_config(_CONFIG.value.to_dict())
  except config_lib.ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  loop.setup_runtime(run)
  import jax  # pylint: disable=g-import-not-at-top
  from tinystories_jax.training import benchmark  # pylint: disable=g-import-not-at-top

  vocab = _VOCAB.value or (512 if run.model.name == "260k" else 4096)
  model_cfg = loop.resolve_model(run, vocab)
  batch = _BATCH.value or run.train.batch_size * run.train.grad_accum_steps
  seq_len = _SEQ.value or run.train.seq_len
  common = {"config": run.model.family + ":" + run.model.name, "batch_size": batch,
            "seq_len": seq_len, "vocab_size": vocab, "date": time.strftime("%Y-%m-%d"),
            "host_cpus": os.cpu_count()}
  # Shared machines: the figures mean little without the contention they were measured under.
  load = lambda: round(os.getloadavg()[0], 2)
  result = benchmark.measure_train_throughput(model_cfg, batch_size=batch, seq_len=seq_len,
                                              steps=_STEPS.value, warmup=_WARMUP.value,
                                              loss=_LOSS.value or run.train.loss,
                                              loss_chunk=run.train.loss_chunk,
                                              loss_vocab_multiple=run.train.loss_vocab_multiple,
                                              loss_kernel=run.train.loss_kernel)
  _emit(dict(common, system="tinystories_jax", load_avg_1m=load(),
             attention=model_cfg.attention_impl, dtype=model_cfg.dtype, jax=jax.__version__,
             **result))
  if _PEER.value == "transformers":
    variants = [True] if model_cfg.family == "llama" else [False, True]
    for compiled in variants:
      name = ("transformers_" + ("LlamaForCausalLM" if model_cfg.family == "llama"
                                 else "GPTNeoForCausalLM") + ("+compile" if compiled else ""))
      peer = _torch_peer(model_cfg, batch_size=batch, seq_len=seq_len, steps=_STEPS.value,
                         warmup=_WARMUP.value, compiled=compiled)
      _emit(dict(common, system=name, load_avg_1m=load(), **peer))


if __name__ == "__main__":
  app.run(main)
