"""Export llama-family checkpoints to llama2.c's `.bin` (the legacy "version 0" layout `run.c`
reads) and its tokenizer.bin.

Layout, all little-endian: seven int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads,
vocab_size — negative when the classifier is not shared — and seq_len), then float32 arrays:
token embedding [V, D]; per layer stacked: rms_att [L, D], wq [L, H*hd, D], wk / wv
[L, K*hd, D], wo [L, D, H*hd], rms_ffn [L, D], w1 [L, F, D], w2 [L, D, F], w3 [L, F, D];
rms_final [D]; freq_cis_real / freq_cis_imag [seq_len, hd/2] (run.c skips them); and the
classifier [V, D] only when not shared. Weights are PyTorch-style [out, in].

run.c rotates adjacent pairs (2i, 2i+1) where our rotary (and transformers') rotates i and
i + hd/2, so q/k rows are permuted per head on the way out; run.c also fixes theta = 10000 and
RMSNorm eps = 1e-5, and assumes head_dim = dim / n_heads.
"""

from __future__ import annotations

import os
import pathlib
import struct

import numpy as np

from tinystories_jax.interop import tokenizer_files as tok
from tinystories_jax.interop import workdir as wd
from tinystories_jax.interop.hf import workdir_tokenizer


class Llama2cError(ValueError):
  """The checkpoint cannot be written in llama2.c's format."""


def _to_interleaved(w_hf: np.ndarray, heads: int) -> np.ndarray:
  """[heads*hd, D] rows from rotate-half order to adjacent-pair order."""
  n, d = w_hf.shape
  hd = n // heads
  return w_hf.reshape(heads, 2, hd // 2, d).transpose(0, 2, 1, 3).reshape(n, d)


def export_llama2c(workdir: str | os.PathLike, output: str | os.PathLike, *,
                   tokenizer_output: str | os.PathLike | None = None,
                   step: int | None = None) -> pathlib.Path:
  """Writes `output` (.bin checkpoint) and, when the workdir has a SentencePiece tokenizer,
  `tokenizer_output` (default: tokenizer.bin beside `output`)."""
  workdir = pathlib.Path(workdir)
  cfg, params, config = wd.read_workdir(workdir, step)

  def need(cond, why):
    if not cond:
      raise Llama2cError(f"llama2.c cannot run this model: {why}.")

  need(cfg.family == "llama", f"it is a {cfg.family} model (use export-hf instead)")
  need(cfg.head_dim * cfg.num_heads == cfg.d_model, "run.c assumes head_dim = dim / n_heads")
  need("local" not in cfg.attention_layers, "run.c has no local attention")
  need(cfg.rope_theta == 10000.0, f"run.c fixes rope theta at 10000, not {cfg.rope_theta}")
  need(abs(cfg.norm_eps - 1e-5) < 1e-12, f"run.c fixes RMSNorm eps at 1e-5, not {cfg.norm_eps}")

  d, h, k, hd, L = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.num_layers
  blocks = [params["blocks"][str(i)] for i in range(L)]

  def stack(fn):
    return np.stack([fn(b) for b in blocks]).astype(np.float32)

  def proj_in(w, heads):  # ours [D, n, hd] -> HF [n*hd, D]
    return np.asarray(w).reshape(d, heads * hd).T

  vocab = cfg.vocab_size if cfg.tie_embeddings else -cfg.vocab_size
  header = struct.pack("iiiiiii", d, cfg.d_ff, L, h, k, vocab, cfg.max_positions)
  arrays = [
      params["embedding"],
      stack(lambda b: b["norm1"]["scale"]),
      stack(lambda b: _to_interleaved(proj_in(b["attn"]["wq"], h), h)),
      stack(lambda b: _to_interleaved(proj_in(b["attn"]["wk"], k), k)),
      stack(lambda b: proj_in(b["attn"]["wv"], k)),
      stack(lambda b: np.asarray(b["attn"]["wo"]).reshape(h * hd, d).T),
      stack(lambda b: b["norm2"]["scale"]),
      stack(lambda b: np.asarray(b["mlp"]["w_gate"]).T),
      stack(lambda b: np.asarray(b["mlp"]["w_down"]).T),
      stack(lambda b: np.asarray(b["mlp"]["w_up"]).T),
      params["final_norm"]["scale"],
  ]
  inv_freq = 1.0 / (10000.0 ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
  angles = np.arange(cfg.max_positions, dtype=np.float64)[:, None] * inv_freq[None, :]
  arrays += [np.cos(angles), np.sin(angles)]
  if not cfg.tie_embeddings:
    arrays.append(params["lm_head"])
  output = pathlib.Path(output)
  output.parent.mkdir(parents=True, exist_ok=True)
  with open(output, "wb") as f:
    f.write(header)
    for a in arrays:
      f.write(np.ascontiguousarray(a, dtype="<f4").tobytes())
  record = workdir_tokenizer(workdir, config)
  if record["kind"] == "sentencepiece":
    target = (pathlib.Path(tokenizer_output) if tokenizer_output
              else output.parent / "tokenizer.bin")
    tok.write_llama2c_tokenizer(workdir / record.get("path", "tokenizer.model"), target,
                                cfg.vocab_size)
  return output
