"""Reading Hugging Face model directories and mapping their tensors to ours and back.

Tensor names and layouts follow transformers' `GPTNeoForCausalLM` and `LlamaForCausalLM`
(PyTorch `Linear` weights are [out, in]; ours are [in, ...out] with heads split out).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib

import numpy as np

from tinystories_jax.interop.safetensors_io import read_safetensors
from tinystories_jax.models.config import ModelConfig


class HFError(ValueError):
  """A Hugging Face directory cannot be imported (one sentence says why)."""


SUPPORTED = {"gpt_neo": "GPTNeoForCausalLM", "llama": "LlamaForCausalLM"}

# Buffers that older transformers versions saved beside the weights; they carry no parameters.
_IGNORED_SUFFIXES = (".attn.attention.bias", ".attn.attention.masked_bias", ".rotary_emb.inv_freq")


@dataclasses.dataclass(frozen=True)
class Entry:
  """One parameter: our path, its HF name, its HF shape and how the layouts relate.

  kind: "copy" (same layout), "transpose" ([out, in] <-> [in, out]), "in_proj" (HF [n*hd, D] <->
  ours [D, n, hd]) or "out_proj" (HF [D, n*hd] <-> ours [n, hd, D]); `heads` is n.
  """

  ours: tuple[str, ...]
  hf: str
  hf_shape: tuple[int, ...]
  kind: str = "copy"
  heads: int = 0

  def to_ours(self, w: np.ndarray) -> np.ndarray:
    if self.kind == "copy":
      return w
    if self.kind == "transpose":
      return w.T
    n = self.heads
    if self.kind == "in_proj":
      return w.T.reshape(w.shape[1], n, w.shape[0] // n)
    return w.T.reshape(n, w.shape[1] // n, w.shape[0])  # out_proj

  def to_hf(self, w: np.ndarray) -> np.ndarray:
    if self.kind == "copy":
      return w
    if self.kind == "transpose":
      return w.T
    if self.kind == "in_proj":
      return w.reshape(w.shape[0], -1).T
    return w.reshape(-1, w.shape[-1]).T  # out_proj


def entries(cfg: ModelConfig) -> list[Entry]:
  """The parameter table of `cfg` in transformers' naming."""
  d, h, k, hd, f, v = (cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.d_ff,
                       cfg.vocab_size)
  out: list[Entry] = []
  if cfg.family == "gpt_neo":
    out += [Entry(("embedding",), "transformer.wte.weight", (v, d)),
            Entry(("position_embedding",), "transformer.wpe.weight", (cfg.max_positions, d))]
    for i in range(cfg.num_layers):
      p, b = f"transformer.h.{i}.", ("blocks", str(i))
      a = p + "attn.attention."
      out += [
          Entry(b + ("norm1", "scale"), p + "ln_1.weight", (d,)),
          Entry(b + ("norm1", "bias"), p + "ln_1.bias", (d,)),
          Entry(b + ("attn", "wq"), a + "q_proj.weight", (h * hd, d), "in_proj", h),
          Entry(b + ("attn", "wk"), a + "k_proj.weight", (k * hd, d), "in_proj", k),
          Entry(b + ("attn", "wv"), a + "v_proj.weight", (k * hd, d), "in_proj", k),
          Entry(b + ("attn", "wo"), a + "out_proj.weight", (d, h * hd), "out_proj", h),
          Entry(b + ("attn", "bo"), a + "out_proj.bias", (d,)),
          Entry(b + ("norm2", "scale"), p + "ln_2.weight", (d,)),
          Entry(b + ("norm2", "bias"), p + "ln_2.bias", (d,)),
          Entry(b + ("mlp", "w_in"), p + "mlp.c_fc.weight", (f, d), "transpose"),
          Entry(b + ("mlp", "b_in"), p + "mlp.c_fc.bias", (f,)),
          Entry(b + ("mlp", "w_out"), p + "mlp.c_proj.weight", (d, f), "transpose"),
          Entry(b + ("mlp", "b_out"), p + "mlp.c_proj.bias", (d,)),
      ]
    out += [Entry(("final_norm", "scale"), "transformer.ln_f.weight", (d,)),
            Entry(("final_norm", "bias"), "transformer.ln_f.bias", (d,))]
  else:
    out.append(Entry(("embedding",), "model.embed_tokens.weight", (v, d)))
    for i in range(cfg.num_layers):
      p, b = f"model.layers.{i}.", ("blocks", str(i))
      a = p + "self_attn."
      out += [
          Entry(b + ("norm1", "scale"), p + "input_layernorm.weight", (d,)),
          Entry(b + ("attn", "wq"), a + "q_proj.weight", (h * hd, d), "in_proj", h),
          Entry(b + ("attn", "wk"), a + "k_proj.weight", (k * hd, d), "in_proj", k),
          Entry(b + ("attn", "wv"), a + "v_proj.weight", (k * hd, d), "in_proj", k),
          Entry(b + ("attn", "wo"), a + "o_proj.weight", (d, h * hd), "out_proj", h),
          Entry(b + ("norm2", "scale"), p + "post_attention_layernorm.weight", (d,)),
          Entry(b + ("mlp", "w_gate"), p + "mlp.gate_proj.weight", (f, d), "transpose"),
          Entry(b + ("mlp", "w_up"), p + "mlp.up_proj.weight", (f, d), "transpose"),
          Entry(b + ("mlp", "w_down"), p + "mlp.down_proj.weight", (d, f), "transpose"),
      ]
    out.append(Entry(("final_norm", "scale"), "model.norm.weight", (d,)))
  if not cfg.tie_embeddings:
    out.append(Entry(("lm_head",), "lm_head.weight", (v, d)))
  return out


# ------------------------------------------------------------------------------------------------
# Reading a directory


def read_hf_config(hf_dir: str | os.PathLike) -> dict:
  """config.json of an HF model directory, checked to be an architecture we import."""
  path = pathlib.Path(hf_dir) / "config.json"
  if not path.is_file():
    raise HFError(f"{hf_dir} has no config.json; pass a Hugging Face model directory "
                  "(config.json + model.safetensors or pytorch_model.bin).")
  try:
    config = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise HFError(f"{path} is not valid JSON ({e}).") from None
  model_type = config.get("model_type")
  if model_type not in SUPPORTED:
    archs = ", ".join(config.get("architectures") or []) or "unknown architecture"
    raise HFError(f"{hf_dir} holds a {model_type!r} model ({archs}); import-hf reads only "
                  f"{' and '.join(SUPPORTED.values())} checkpoints.")
  return config


def read_hf_tensors(hf_dir: str | os.PathLike) -> dict[str, np.ndarray]:
  """All tensors of an HF directory: model.safetensors (or its sharded index) is preferred;
  pytorch_model.bin is read with `torch.load(weights_only=True)` (never arbitrary pickles)."""
  hf_dir = pathlib.Path(hf_dir)
  single, index = hf_dir / "model.safetensors", hf_dir / "model.safetensors.index.json"
  if single.is_file():
    return read_safetensors(single)
  if index.is_file():
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    tensors: dict[str, np.ndarray] = {}
    for shard in shards:
      tensors.update(read_safetensors(hf_dir / shard))
    return tensors
  binary = hf_dir / "pytorch_model.bin"
  if binary.is_file():
    return _read_torch_bin(binary)
  raise HFError(f"{hf_dir} has no model.safetensors or pytorch_model.bin to read weights from.")


def _read_torch_bin(path: pathlib.Path) -> dict[str, np.ndarray]:
  try:
    import torch  # noqa: PLC0415
  except ImportError:
    raise HFError(f"reading {path.name} needs PyTorch (pip install torch), or convert the "
                  "checkpoint to model.safetensors.") from None
  try:
    state = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises several types for bad zips and refused pickles
    raise HFError(f"{path} is truncated, corrupt or holds more than tensors, so it cannot be "
                  f"loaded with weights_only=True ({type(e).__name__}: {str(e)[:200]}).") from None
  if not isinstance(state, dict):
    raise HFError(f"{path} does not hold a state dict of tensors.")
  out = {}
  for name, t in state.items():
    if not isinstance(t, torch.Tensor):
      raise HFError(f"{path}: entry {name!r} is not a tensor.")
    t = t.detach().cpu()
    out[name] = (t.float() if t.dtype == torch.bfloat16 else t).numpy()
  return out


def hf_to_params(cfg: ModelConfig, tensors: dict[str, np.ndarray], *, source: str
                 ) -> dict:
  """Our pure-dict params (float32) from HF tensors, with shape and name checks."""
  table = entries(cfg)
  known = {e.hf for e in table}
  ignorable = {n for n in tensors if n.endswith(_IGNORED_SUFFIXES)}
  if cfg.tie_embeddings:
    ignorable.add("lm_head.weight")  # some writers store the tied copy too
  missing = sorted(known - set(tensors))
  if missing:
    raise HFError(f"{source} lacks tensor(s) {missing[:3]}{' ...' if len(missing) > 3 else ''} "
                  "that its config.json implies; the weights do not belong to this config.")
  unknown = sorted(set(tensors) - known - ignorable)
  if unknown:
    raise HFError(f"{source} holds tensor(s) {unknown[:3]}{' ...' if len(unknown) > 3 else ''} "
                  "that its config.json does not explain; the weights do not belong to it.")
  params: dict = {}
  for e in table:
    w = tensors[e.hf]
    if tuple(w.shape) != e.hf_shape:
      raise HFError(f"{source}: tensor {e.hf} has shape {tuple(w.shape)} but config.json implies "
                    f"{e.hf_shape}; the weights do not belong to this config.")
    node = params
    for key in e.ours[:-1]:
      node = node.setdefault(key, {})
    node[e.ours[-1]] = np.ascontiguousarray(e.to_ours(np.asarray(w, dtype=np.float32)))
  return params


def params_to_hf(cfg: ModelConfig, params: dict) -> dict[str, np.ndarray]:
  """HF-named float32 tensors from our pure-dict params (the tied lm_head is not written)."""
  out = {}
  for e in entries(cfg):
    node = params
    for key in e.ours:
      node = node[key]
    out[e.hf] = np.ascontiguousarray(e.to_hf(np.asarray(node, dtype=np.float32)))
  return out
