"""`ModelConfig`: one frozen dataclass that describes both model families.

The dataclass is resolved on construction: derived sizes (`num_kv_heads`, `head_dim`, `d_ff`,
`attention_layers`) are filled in, so `to_dict()` always holds concrete numbers and a config read
back with `from_dict()` builds the same model. To change a size, build a new config (or use
`tinystories_jax.models.presets`) rather than `dataclasses.replace`, which keeps the derived
sizes. Checkpoints store `to_dict()` under `"model"` in `WORKDIR/config.json`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

FAMILIES = ("gpt_neo", "llama")
ATTENTION_KINDS = ("global", "local")
DTYPES = ("float32", "bfloat16", "float16")
REMAT = ("none", "block")
NORM_IMPLS = ("xla", "pallas")
QKV_IMPLS = ("xla", "pallas")
MLP_IMPLS = ("xla", "pallas")


def llama_hidden_dim(d_model: int, multiple_of: int) -> int:
  """SwiGLU width as llama2.c computes it: 2/3 of 4*d, rounded up to `multiple_of`."""
  hidden = int(2 * (4 * d_model) / 3)
  return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture and numerics of a GPT-Neo or llama2.c-shaped decoder.

  Attributes:
    family: "gpt_neo" (learned positions, LayerNorm, gelu_new MLP with biases, no 1/sqrt(d) score
      scaling, alternating global/local attention) or "llama" (rotary, RMSNorm, SwiGLU, no biases).
    vocab_size: rows of the (tied) embedding.
    d_model: residual width.
    num_layers: decoder blocks.
    num_heads: query heads.
    num_kv_heads: key/value heads (grouped-query attention); None means `num_heads`.
    head_dim: per-head width; None means `d_model // num_heads`.
    d_ff: MLP width; None means 4*d_model (gpt_neo) or `llama_hidden_dim(d_model, multiple_of)`.
    multiple_of: llama's rounding of the SwiGLU width (used only when `d_ff` is None).
    max_positions: gpt_neo's learned position table size; llama's maximum sequence length (what
      exports record as max_position_embeddings / llama2.c seq_len).
    attention_layers: per-layer "global" | "local"; None means all global (llama) or
      global, local alternating (gpt_neo).
    window: keys a local-attention query sees, itself included (GPT-Neo: 256).
    norm_eps: LayerNorm / RMSNorm epsilon.
    rope_theta: rotary base (llama).
    tie_embeddings: output projection is the input embedding (both released families do this).
    attention_impl: name registered in `tinystories_jax.models.attention` ("reference", "xla",
      "cudnn", "pallas", "cpu", "auto").
    dtype: compute dtype of activations and matmuls; parameters stay `param_dtype`; softmax,
      norms' statistics and logits are float32 regardless.
    param_dtype: storage dtype of the parameters.
    norm_impl: "xla" (the norms as jnp, which XLA fuses) or "pallas" (llama only: each residual
      add and the RMSNorm after it as one Pallas kernel each way, `kernels.rms_norm`; GPUs, or
      the interpreter under `flash_attention.force_interpret`).
    qkv_impl: "xla" (q, k and v split out of their projection and rotated by XLA before the
      attention call, and their gradients stacked after it) or "pallas" (llama only: the Pallas
      attention kernels read them from the stacked projection and write its gradient whole,
      rotary's backward included, `kernels.flash_attention.flash_attention_stacked`; GPUs, or
      the interpreter under `flash_attention.force_interpret`).
    mlp_impl: "xla" (SwiGLU's backward through its activation as an XLA fusion) or "pallas"
      (llama only: that step as one Pallas kernel, `kernels.swiglu`; GPUs, or the interpreter
      under `flash_attention.force_interpret`). The matmuls are XLA's either way.
    remat: "none" or "block" (recompute each block in the backward pass).
    scan_layers: run the blocks as one `lax.scan` (models/scan.py); same parameters and results.
    init_std: standard deviation of the normal initializer for matrices and embeddings.
  """

  family: str
  vocab_size: int
  d_model: int
  num_layers: int
  num_heads: int
  num_kv_heads: int | None = None
  head_dim: int | None = None
  d_ff: int | None = None
  multiple_of: int = 32
  max_positions: int = 2048
  attention_layers: tuple[str, ...] | None = None
  window: int = 256
  norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  tie_embeddings: bool = True
  attention_impl: str = "auto"
  dtype: str = "float32"
  param_dtype: str = "float32"
  norm_impl: str = "xla"
  qkv_impl: str = "xla"
  mlp_impl: str = "xla"
  remat: str = "none"
  scan_layers: bool = False
  init_std: float = 0.02

  def __post_init__(self):
    def fail(msg):
      raise ValueError(f"ModelConfig: {msg}")

    if self.family not in FAMILIES:
      fail(f"family {self.family!r} is not one of {FAMILIES}.")
    for name in ("vocab_size", "d_model", "num_layers", "num_heads", "max_positions", "window"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        fail(f"{name} must be a positive integer, got {value!r}.")
    kv = self.num_heads if self.num_kv_heads is None else self.num_kv_heads
    if kv <= 0 or self.num_heads % kv:
      fail(f"num_kv_heads={kv} must divide num_heads={self.num_heads}.")
    head_dim = self.head_dim
    if head_dim is None:
      if self.d_model % self.num_heads:
        fail(f"d_model={self.d_model} is not divisible by num_heads={self.num_heads}; "
             "set head_dim explicitly.")
      head_dim = self.d_model // self.num_heads
    if self.family == "llama" and head_dim % 2:
      fail(f"rotary embeddings need an even head_dim, got {head_dim}.")
    d_ff = self.d_ff
    if d_ff is None:
      d_ff = 4 * self.d_model if self.family == "gpt_neo" else llama_hidden_dim(
          self.d_model, self.multiple_of)
    layers = self.attention_layers
    if layers is None:
      if self.family == "gpt_neo":
        layers = tuple("global" if i % 2 == 0 else "local" for i in range(self.num_layers))
      else:
        layers = ("global",) * self.num_layers
    layers = tuple(layers)
    if len(layers) != self.num_layers or any(k not in ATTENTION_KINDS for k in layers):
      fail(f"attention_layers must list {self.num_layers} entries from {ATTENTION_KINDS}, "
           f"got {layers}.")
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in DTYPES:
        fail(f"{name} {getattr(self, name)!r} is not one of {DTYPES}.")
    if self.remat not in REMAT:
      fail(f"remat {self.remat!r} is not one of {REMAT}.")
    if self.norm_impl not in NORM_IMPLS:
      fail(f"norm_impl {self.norm_impl!r} is not one of {NORM_IMPLS}.")
    if self.norm_impl == "pallas" and self.family != "llama":
      fail("norm_impl 'pallas' (a config's model.norm) is llama's RMSNorm kernel; GPT-Neo's "
           "LayerNorm has none: use model.norm='xla'.")
    if self.qkv_impl not in QKV_IMPLS:
      fail(f"qkv_impl {self.qkv_impl!r} is not one of {QKV_IMPLS}.")
    if self.qkv_impl == "pallas" and self.family != "llama":
      fail("qkv_impl 'pallas' (a config's model.qkv) reads rotary q/k from llama's stacked "
           "projection; GPT-Neo has no rotary: use model.qkv='xla'.")
    if self.qkv_impl == "pallas" and self.attention_impl not in ("pallas", "auto"):
      fail(f"qkv_impl 'pallas' (model.qkv) runs in the Pallas attention kernels, not "
           f"attention_impl {self.attention_impl!r} (model.attention): set it to 'pallas', or "
           "qkv to 'xla'.")
    if self.mlp_impl not in MLP_IMPLS:
      fail(f"mlp_impl {self.mlp_impl!r} is not one of {MLP_IMPLS}.")
    if self.mlp_impl == "pallas" and self.family != "llama":
      fail("mlp_impl 'pallas' (a config's model.mlp) is llama's SwiGLU kernel; GPT-Neo's "
           "GELU MLP has none: use model.mlp='xla'.")
    object.__setattr__(self, "num_kv_heads", kv)
    object.__setattr__(self, "head_dim", head_dim)
    object.__setattr__(self, "d_ff", d_ff)
    object.__setattr__(self, "attention_layers", layers)

  def to_dict(self) -> dict[str, Any]:
    """A JSON-able dict (tuples become lists) that `from_dict` reads back."""
    d = dataclasses.asdict(self)
    d["attention_layers"] = list(self.attention_layers)
    return d

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
    """Reads `to_dict()` output; unknown keys are an error (they usually are typos)."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(f"ModelConfig has no field(s) {unknown}; known fields: {sorted(names)}.")
    d = dict(d)
    if d.get("attention_layers") is not None:
      d["attention_layers"] = tuple(d["attention_layers"])
    return cls(**d)

  @property
  def is_gpt_neo(self) -> bool:
    return self.family == "gpt_neo"


def count_params(cfg: ModelConfig) -> int:
  """Number of parameters `build(cfg)` creates (tied embeddings counted once)."""
  d, h, k, hd, f, v = (cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.d_ff,
                       cfg.vocab_size)
  attn = d * h * hd + 2 * d * k * hd + h * hd * d
  if cfg.family == "gpt_neo":
    attn += d  # output projection bias
    mlp = d * f + f + f * d + d
    norms = 2 * 2 * d
    extra = cfg.max_positions * d + 2 * d  # position table, final LayerNorm
  else:
    mlp = 3 * d * f
    norms = 2 * d
    extra = d  # final RMSNorm
  total = cfg.num_layers * (attn + mlp + norms) + v * d + extra
  if not cfg.tie_embeddings:
    total += v * d
  return total


def count_flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
  """Training FLOPs per token, the PaLM count: 6 * non-embedding params + 12 * L * d * T.

  The output projection is a matmul and is included (6 * V * d); the embedding and position
  lookups are not. Attention uses `seq_len` for every layer (local layers are not discounted).
  """
  n = count_params(cfg) - cfg.vocab_size * cfg.d_model * (1 if cfg.tie_embeddings else 2)
  if cfg.family == "gpt_neo":
    n -= cfg.max_positions * cfg.d_model
  n += cfg.vocab_size * cfg.d_model  # the output projection matmul
  return 6 * n + 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len
