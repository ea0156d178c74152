"""Attention: one entry point, several registered implementations.

Layouts: queries `q_bthd` [batch, query length T, heads H, head_dim D], keys and values `k_bskd`,
`v_bskd` [batch, key length S, kv heads K, D] with K dividing H (grouped-query attention: query
head h reads kv head h // (H // K), as in transformers' `repeat_kv` and llama2.c's `run.c`).

Masking, shared by every implementation:
- `causal`: query i sees key j iff j <= i + (S - T) (queries are the last T of the S positions,
  bottom-right aligned as in transformers and flash-attention >= 2.1; T == S is the usual case).
- `window`: additionally i + (S - T) - j < window, i.e. a query sees `window` keys, itself
  included. This is exactly transformers' GPT-Neo local mask (`bias ^ tril(bias, -window_size)`).
  Requires `causal=True`.
- segment ids (packing): query i sees key j only when their segment ids are equal; segment 0 is
  padding and its query rows come out as zeros. Giving only `q_segment_ids_bt` with T == S uses
  them for the keys too.

`scale=None` means 1/sqrt(D); GPT-Neo passes 1.0. Softmax always runs in float32; the output has
the query's dtype. An implementation that cannot serve a request raises `AttentionUnsupported`
with one sentence naming an alternative; nothing falls back silently (except `auto`, whose job is
to choose).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

AttentionFn = Callable[..., jax.Array]

_REGISTRY: dict[str, AttentionFn] = {}


class AttentionUnsupported(ValueError):
  """An implementation cannot serve this request (platform, dtype, head_dim, mask)."""


def register_attention(name: str, fn: AttentionFn) -> None:
  """Registers `fn(q_bthd, k_bskd, v_bskd, *, causal, window, q_segment_ids_bt, kv_segment_ids_bs,
  scale) -> o_bthd` under `name` (replacing any previous one). `scale` arrives resolved (a float).
  """
  if name == "auto":
    raise ValueError("'auto' is reserved for choosing among the registered implementations.")
  _REGISTRY[name] = fn


def implementations() -> list[str]:
  """Names `attention(impl=...)` accepts."""
  return sorted(_REGISTRY) + ["auto"]


def attention(q_bthd: jax.Array, k_bskd: jax.Array, v_bskd: jax.Array, *, impl: str,
              causal: bool = True, window: int | None = None,
              q_segment_ids_bt: jax.Array | None = None,
              kv_segment_ids_bs: jax.Array | None = None,
              scale: float | None = None) -> jax.Array:
  """Multi-head (grouped-query) attention; see the module docstring for layouts and masks.

  Returns:
    o_bthd with the dtype of `q_bthd`.
  """
  if q_bthd.ndim != 4 or k_bskd.ndim != 4 or v_bskd.shape != k_bskd.shape:
    raise ValueError(f"attention takes q [B,T,H,D] and k, v [B,S,K,D] of one shape; got "
                     f"q {q_bthd.shape}, k {k_bskd.shape}, v {v_bskd.shape}.")
  b, t, h, d = q_bthd.shape
  bk, s, k, dk = k_bskd.shape
  if bk != b or dk != d or h % k:
    raise ValueError(f"attention: k/v {k_bskd.shape} do not fit q {q_bthd.shape} (same batch and "
                     "head_dim, kv heads dividing query heads).")
  if window is not None:
    if not causal:
      raise ValueError("attention: a sliding window needs causal=True.")
    if window <= 0:
      raise ValueError(f"attention: window must be positive, got {window}.")
  if kv_segment_ids_bs is None and q_segment_ids_bt is not None:
    if t != s:
      raise ValueError("attention: give kv_segment_ids_bs too when T != S.")
    kv_segment_ids_bs = q_segment_ids_bt
  if q_segment_ids_bt is None and kv_segment_ids_bs is not None:
    raise ValueError("attention: kv_segment_ids_bs needs q_segment_ids_bt.")
  if q_segment_ids_bt is not None and (q_segment_ids_bt.shape != (b, t)
                                       or kv_segment_ids_bs.shape != (b, s)):
    raise ValueError(f"attention: segment ids must be [B,T] and [B,S]; got "
                     f"{q_segment_ids_bt.shape} and {kv_segment_ids_bs.shape}.")
  scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
  if impl == "auto":
    impl = choose_auto(q_bthd.dtype, d, window, same_length=t == s)
  fn = _REGISTRY.get(impl)
  if fn is None:
    raise ValueError(f"Unknown attention implementation {impl!r}; choose one of "
                     f"{implementations()}.")
  return fn(q_bthd, k_bskd, v_bskd, causal=causal, window=window,
            q_segment_ids_bt=q_segment_ids_bt, kv_segment_ids_bs=kv_segment_ids_bs, scale=scale)


# Largest head size for which `auto` prefers our Pallas kernel over cuDNN on GPUs (measured on an
# H200, benchmarks/results/2026-11-26-h200.md).
PALLAS_GPU_MAX_HEAD_DIM = 64


def choose_auto(dtype, head_dim: int, window: int | None, backend: str | None = None, *,
                same_length: bool = True) -> str:
  """What `auto` runs, per platform, from the measurements in docs/kernels.md:

  - GPU: `pallas` for head_dim <= 64 where the kernel supports it (on an H200 its forward +
    backward was 1.00-1.17x cuDNN's causal and 1.05-1.53x with a 256 window at head_dim 48 and
    64), else `cudnn` where it can serve the request (2x ours at head_dim 128), else `pallas`,
    else `xla`;
  - TPU: `pallas` where the kernel supports it, else `xla`;
  - CPU: `cpu` (the block-skipping formulation, measured fastest there; docs/models.md).
  """
  backend = backend or jax.default_backend()
  if backend == "cpu":
    return "cpu"
  pallas_ok = backend in ("gpu", "tpu") and _pallas_supports(head_dim, dtype, backend)
  if backend == "gpu" and pallas_ok and head_dim <= PALLAS_GPU_MAX_HEAD_DIM:
    return "pallas"
  cudnn_window_ok = window is None or same_length
  if backend == "gpu" and cudnn_window_ok and _cudnn_problem(dtype, head_dim, backend) is None:
    return "cudnn"
  if pallas_ok:
    return "pallas"
  return "xla"


def _pallas_support(head_dim: int, dtype, backend: str) -> tuple[bool, str]:
  """The kernel module's `supports(...)`: (ok, why not, naming the alternative)."""
  try:
    import importlib  # noqa: PLC0415

    module = importlib.import_module(_PALLAS_MODULE)
  except ImportError:
    return False, f"attention impl 'pallas' needs {_PALLAS_MODULE}, which this installation lacks."
  ok, why = module.supports(head_dim, dtype, backend)
  return bool(ok), why


def _pallas_supports(head_dim: int, dtype, backend: str) -> bool:
  return _pallas_support(head_dim, dtype, backend)[0]


# ------------------------------------------------------------------------------------------------
# Masks


def structural_mask(t: int, s: int, *, causal: bool, window: int | None) -> jax.Array | None:
  """Boolean [T, S] causal / window mask (None when neither applies)."""
  if not causal:
    return None
  q_pos = jnp.arange(t, dtype=jnp.int32)[:, None] + (s - t)
  k_pos = jnp.arange(s, dtype=jnp.int32)[None, :]
  mask = k_pos <= q_pos
  if window is not None:
    mask &= q_pos - k_pos < window
  return mask


def segment_mask(q_segment_ids_bt: jax.Array, kv_segment_ids_bs: jax.Array) -> jax.Array:
  """Boolean [B, T, S]: same segment. Padding (0) sees padding; callers zero its rows."""
  return q_segment_ids_bt[:, :, None] == kv_segment_ids_bs[:, None, :]


def attention_mask(t: int, s: int, *, causal: bool, window: int | None,
                   q_segment_ids_bt: jax.Array | None,
                   kv_segment_ids_bs: jax.Array | None) -> jax.Array | None:
  """Boolean [B or 1, T, S] mask (True = attend), or None when nothing is masked."""
  mask = structural_mask(t, s, causal=causal, window=window)
  if mask is not None:
    mask = mask[None]
  if q_segment_ids_bt is not None:
    seg = segment_mask(q_segment_ids_bt, kv_segment_ids_bs)
    seg &= (q_segment_ids_bt != 0)[:, :, None]
    mask = seg if mask is None else mask & seg
  return mask


def _zero_padding_rows(o_bthd: jax.Array, q_segment_ids_bt: jax.Array | None) -> jax.Array:
  if q_segment_ids_bt is None:
    return o_bthd
  keep = (q_segment_ids_bt != 0)[:, :, None, None]
  return jnp.where(keep, o_bthd, jnp.zeros((), o_bthd.dtype))


# ------------------------------------------------------------------------------------------------
# reference: the oracle


def reference_attention(q_bthd, k_bskd, v_bskd, *, causal, window, q_segment_ids_bt,
                        kv_segment_ids_bs, scale):
  """einsum + float32 softmax, with fully masked rows exactly zero. Slow and obviously right."""
  b, t, h, d = q_bthd.shape
  s, k = k_bskd.shape[1], k_bskd.shape[2]
  g = h // k
  q = q_bthd.astype(jnp.float32).reshape(b, t, k, g, d)
  logits = jnp.einsum("btkgd,bskd->bkgts", q, k_bskd.astype(jnp.float32)) * scale
  mask = attention_mask(t, s, causal=causal, window=window, q_segment_ids_bt=q_segment_ids_bt,
                        kv_segment_ids_bs=kv_segment_ids_bs)
  if mask is not None:
    mask = mask[:, None, None]
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1)
  if mask is not None:
    probs = jnp.where(mask, probs, 0.0)
  o = jnp.einsum("bkgts,bskd->btkgd", probs, v_bskd.astype(jnp.float32))
  return o.reshape(b, t, h, d).astype(q_bthd.dtype)


# ------------------------------------------------------------------------------------------------
# xla / cudnn: jax.nn.dot_product_attention


def _dpa(q_bthd, k_bskd, v_bskd, *, causal, window, q_segment_ids_bt, kv_segment_ids_bs, scale,
         implementation):
  t, s = q_bthd.shape[1], k_bskd.shape[1]
  mask = None
  is_causal = False
  local_window_size = None
  if causal and t == s:
    is_causal = True
    if window is not None:
      local_window_size = (window - 1, 0)
  elif causal:  # bottom-right aligned: spell the mask out.
    mask = structural_mask(t, s, causal=causal, window=window)[None, None]
  if q_segment_ids_bt is not None:
    seg = segment_mask(q_segment_ids_bt, kv_segment_ids_bs)[:, None]
    mask = seg if mask is None else mask & seg
  o = jax.nn.dot_product_attention(q_bthd, k_bskd, v_bskd, mask=mask, scale=scale,
                                   is_causal=is_causal, local_window_size=local_window_size,
                                   implementation=implementation)
  return _zero_padding_rows(o, q_segment_ids_bt)


def xla_attention(q_bthd, k_bskd, v_bskd, *, causal, window, q_segment_ids_bt, kv_segment_ids_bs,
                  scale):
  """`jax.nn.dot_product_attention(implementation="xla")`: any platform, dtype and head_dim."""
  return _dpa(q_bthd, k_bskd, v_bskd, causal=causal, window=window,
              q_segment_ids_bt=q_segment_ids_bt, kv_segment_ids_bs=kv_segment_ids_bs,
              scale=scale, implementation="xla")


def _cudnn_problem(dtype, head_dim: int, backend: str | None = None) -> str | None:
  """Why cuDNN cannot serve a request, or None when it can."""
  backend = backend or jax.default_backend()
  if backend != "gpu":
    return (f"cuDNN attention needs an NVIDIA GPU but JAX is running on {backend}; "
            "use attention impl 'xla' (or 'auto').")
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    return (f"cuDNN attention takes bfloat16 or float16 inputs, not {jnp.dtype(dtype).name}; set "
            "the model dtype to bfloat16 or use attention impl 'xla'.")
  if head_dim % 8 or head_dim > 128:
    return (f"cuDNN attention needs head_dim a multiple of 8 up to 128, not {head_dim}; "
            "use attention impl 'xla' or 'pallas'.")
  return None


def unsupported_reason(impl: str, dtype, head_dim: int,
                       backend: str | None = None) -> str | None:
  """Why `impl` cannot serve a model of this dtype and head size on `backend` (default: JAX's),
  in one sentence naming the alternative; None when it can (or when only a call can tell)."""
  backend = backend or jax.default_backend()
  if impl == "cudnn":
    return _cudnn_problem(dtype, head_dim, backend)
  if impl == "pallas":
    ok, why = _pallas_support(head_dim, dtype, backend)
    return None if ok else why
  return None


def cudnn_attention(q_bthd, k_bskd, v_bskd, *, causal, window, q_segment_ids_bt,
                    kv_segment_ids_bs, scale):
  """`jax.nn.dot_product_attention(implementation="cudnn")`: NVIDIA GPUs, bf16/fp16, D % 8 == 0."""
  problem = _cudnn_problem(q_bthd.dtype, q_bthd.shape[-1])
  if problem is None and window is not None and q_bthd.shape[1] != k_bskd.shape[1]:
    problem = ("cuDNN attention takes a sliding window only when queries and keys have one "
               "length; use attention impl 'xla'.")
  if problem:
    raise AttentionUnsupported(problem)
  return _dpa(q_bthd, k_bskd, v_bskd, causal=causal, window=window,
              q_segment_ids_bt=q_segment_ids_bt, kv_segment_ids_bs=kv_segment_ids_bs,
              scale=scale, implementation="cudnn")


# ------------------------------------------------------------------------------------------------
# pallas: the registration point for tinystories_jax.kernels.flash_attention

_PALLAS_MODULE = "tinystories_jax.kernels.flash_attention"


def pallas_attention(q_bthd, k_bskd, v_bskd, *, causal, window, q_segment_ids_bt,
                     kv_segment_ids_bs, scale):
  """Calls `tinystories_jax.kernels.flash_attention.flash_attention`, imported on first use."""
  try:
    import importlib  # noqa: PLC0415

    module = importlib.import_module(_PALLAS_MODULE)
  except ModuleNotFoundError as e:
    if e.name not in (_PALLAS_MODULE, "tinystories_jax.kernels"):
      raise
    raise AttentionUnsupported(
        f"attention impl 'pallas' needs {_PALLAS_MODULE}, which this installation lacks; use "
        "impl 'cudnn' on a GPU or 'xla'.") from None
  return module.flash_attention(q_bthd, k_bskd, v_bskd, causal=causal, window=window,
                                q_segment_ids_bt=q_segment_ids_bt,
                                kv_segment_ids_bs=kv_segment_ids_bs, scale=scale)


register_attention("reference", reference_attention)
register_attention("xla", xla_attention)
register_attention("cudnn", cudnn_attention)
register_attention("pallas", pallas_attention)

# The CPU formulation lives in its own module; importing it registers "cpu".
from tinystories_jax.models import attention_cpu  # noqa: E402,F401

__all__ = [
    "AttentionUnsupported", "attention", "attention_mask", "choose_auto", "implementations",
    "unsupported_reason",
    "reference_attention", "register_attention", "structural_mask", "xla_attention",
    "cudnn_attention", "pallas_attention",
]
