"""Import Hugging Face GPT-Neo / Llama directories into a workdir; export a workdir back.

    import_hf(hf_dir, workdir)      config.json + model.safetensors | pytorch_model.bin -> workdir
    export_hf(workdir, output_dir)  workdir -> a directory `from_pretrained` loads

Everything is float32 on the way through; nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil

from tinystories_jax.interop import tokenizer_files as tok
from tinystories_jax.interop import workdir as wd
from tinystories_jax.interop.hf_weights import (
    HFError, SUPPORTED, hf_to_params, params_to_hf, read_hf_config, read_hf_tensors)
from tinystories_jax.interop.safetensors_io import write_safetensors
from tinystories_jax.models.config import ModelConfig, llama_hidden_dim

# ------------------------------------------------------------------------------------------------
# config.json <-> ModelConfig


def _expand_attention_types(types) -> tuple[str, ...]:
  layers: list[str] = []
  for kinds, repeat in types:
    layers.extend(list(kinds) * int(repeat))
  return tuple(layers)


def _compress_attention_layers(layers: tuple[str, ...]) -> list:
  n = len(layers)
  for p in range(1, n + 1):
    if n % p == 0 and layers == layers[:p] * (n // p):
      return [[list(layers[:p]), n // p]]
  return [[list(layers), 1]]  # unreachable: p == n always matches


def model_config_from_hf(hf: dict, source: str = "config.json") -> ModelConfig:
  """Our ModelConfig for an HF GPT-Neo or Llama config.json (unsupported features raise)."""
  def need(cond, what):
    if not cond:
      raise HFError(f"{source}: {what}; import-hf cannot represent that model.")

  try:
    if hf["model_type"] == "gpt_neo":
      act = hf.get("activation_function", "gelu_new")
      need(act == "gelu_new", f"activation_function is {act!r}, not 'gelu_new'")
      d = hf["hidden_size"]
      return ModelConfig(
          family="gpt_neo", vocab_size=hf["vocab_size"], d_model=d,
          num_layers=hf["num_layers"], num_heads=hf["num_heads"],
          d_ff=hf.get("intermediate_size") or 4 * d,
          max_positions=hf["max_position_embeddings"],
          attention_layers=_expand_attention_types(hf["attention_types"]),
          window=hf.get("window_size", 256), norm_eps=hf.get("layer_norm_epsilon", 1e-5),
          tie_embeddings=hf.get("tie_word_embeddings", True))
    act = hf.get("hidden_act", "silu")
    need(act == "silu", f"hidden_act is {act!r}, not 'silu'")
    need(not hf.get("attention_bias", False), "attention_bias is true")
    need(not hf.get("mlp_bias", False), "mlp_bias is true")
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling")
    need(rope.get("rope_type", "default") == "default" and not scaling,
         f"it uses rope scaling {scaling or rope}")
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    heads = hf["num_attention_heads"]
    # d_ff is explicit; record the llama2.c rounding that yields it (so an imported llama2.c
    # shape equals our preset of that shape), or our default when none does.
    multiple_of = next((m for m in (32, 4, 8, 16, 64, 128, 256)
                        if llama_hidden_dim(hf["hidden_size"], m) == hf["intermediate_size"]), 32)
    return ModelConfig(
        family="llama", vocab_size=hf["vocab_size"], d_model=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"], num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        d_ff=hf["intermediate_size"], multiple_of=multiple_of,
        max_positions=hf.get("max_position_embeddings", 2048),
        norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=float(theta),
        tie_embeddings=hf.get("tie_word_embeddings", False))
  except KeyError as e:
    raise HFError(f"{source} lacks the key {e.args[0]!r}.") from None
  except ValueError as e:
    if isinstance(e, HFError):
      raise
    raise HFError(f"{source} describes an inconsistent model ({e}).") from None


def hf_config_from_model(cfg: ModelConfig, *, bos_id: int | None, eos_id: int | None,
                         pad_id: int | None = None) -> dict:
  """transformers config.json for `cfg` (float32 weights)."""
  common = {"architectures": [SUPPORTED[cfg.family]], "model_type": cfg.family,
            "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
            "max_position_embeddings": cfg.max_positions, "bos_token_id": bos_id,
            "eos_token_id": eos_id, "pad_token_id": pad_id,
            "tie_word_embeddings": cfg.tie_embeddings, "use_cache": True,
            "dtype": "float32", "torch_dtype": "float32"}
  if cfg.family == "gpt_neo":
    if cfg.head_dim * cfg.num_heads != cfg.d_model:
      raise HFError(f"transformers' GPT-Neo needs head_dim * num_heads == d_model; this model "
                    f"has {cfg.head_dim} * {cfg.num_heads} != {cfg.d_model}.")
    if cfg.num_kv_heads != cfg.num_heads:
      raise HFError("transformers' GPT-Neo has no grouped-query attention; this model has "
                    f"{cfg.num_kv_heads} kv heads for {cfg.num_heads} heads.")
    return {**common, "num_layers": cfg.num_layers, "num_heads": cfg.num_heads,
            "attention_types": _compress_attention_layers(cfg.attention_layers),
            "window_size": cfg.window, "intermediate_size": cfg.d_ff,
            "activation_function": "gelu_new", "layer_norm_epsilon": cfg.norm_eps,
            "resid_dropout": 0.0, "embed_dropout": 0.0, "attention_dropout": 0.0,
            "initializer_range": cfg.init_std}
  if "local" in cfg.attention_layers:
    raise HFError("transformers' Llama has no per-layer local attention; this model uses it.")
  return {**common, "num_hidden_layers": cfg.num_layers,
          "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
          "head_dim": cfg.head_dim, "intermediate_size": cfg.d_ff, "hidden_act": "silu",
          "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
          "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
          "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
          "initializer_range": cfg.init_std}


# ------------------------------------------------------------------------------------------------
# import


def import_hf(hf_dir: str | os.PathLike, workdir: str | os.PathLike, *,
              attention_impl: str = "auto", dtype: str = "float32") -> pathlib.Path:
  """Writes a workdir (step 0) holding the HF model in `hf_dir` and its tokenizer files.

  GPT-Neo checkpoints use the GPT-Neo (GPT-2 BPE) tokenizer: its files are copied when the
  directory has them, and config.json records that the workdir needs it either way.
  """
  hf_dir = pathlib.Path(hf_dir)
  hf = read_hf_config(hf_dir)
  cfg = model_config_from_hf(hf, source=str(hf_dir / "config.json"))
  cfg = dataclasses.replace(cfg, attention_impl=attention_impl, dtype=dtype)
  params = hf_to_params(cfg, read_hf_tensors(hf_dir), source=str(hf_dir))
  files = tok.hf_tokenizer_files(hf_dir)
  tok.check_vocab(cfg.vocab_size, tok.hf_tokenizer_vocab_size(hf_dir), str(hf_dir))
  ids = {"bos_id": hf.get("bos_token_id"), "eos_id": hf.get("eos_token_id"),
         "pad_id": hf.get("pad_token_id")}
  if "tokenizer.model" in files:  # a SentencePiece model: the project's own tokenizer kind
    tokenizer = {"kind": "sentencepiece", "path": "tokenizer.model", **ids}
  else:
    tokenizer = {"kind": "hf", "files": files, **ids}
    if cfg.family == "gpt_neo":
      tokenizer["name"] = tok.GPT_NEO_TOKENIZER
      if not {"tokenizer.json", "vocab.json"} & set(files):
        tokenizer["note"] = (f"needs the GPT-Neo tokenizer ({tok.GPT_NEO_TOKENIZER}): copy its "
                             "tokenizer.json (or vocab.json and merges.txt) into this workdir.")
  return wd.write_workdir(
      workdir, cfg, params, tokenizer=tokenizer, files={n: str(hf_dir / n) for n in files},
      extra={"source": {"hf_dir": str(hf_dir.absolute()), "architecture": SUPPORTED[
          cfg.family]}})


# ------------------------------------------------------------------------------------------------
# export


def workdir_tokenizer(workdir: pathlib.Path, config: dict) -> dict:
  """The tokenizer record of a workdir (config["data"]["tokenizer"], else tokenizer.model)."""
  record = (config.get("data") or {}).get("tokenizer")
  if isinstance(record, dict) and "kind" in record:
    return record
  if (workdir / "tokenizer.model").is_file():
    return {"kind": "sentencepiece", "path": "tokenizer.model"}
  return {"kind": "none"}


def export_hf(workdir: str | os.PathLike, output_dir: str | os.PathLike,
              step: int | None = None) -> pathlib.Path:
  """Writes config.json, model.safetensors and the tokenizer files of a workdir's checkpoint."""
  workdir = pathlib.Path(workdir)
  cfg, params, config = wd.read_workdir(workdir, step)
  record = workdir_tokenizer(workdir, config)
  ids = {k: record.get(k) for k in ("bos_id", "eos_id", "pad_id")}
  sp_path = workdir / record.get("path", "tokenizer.model")
  if record["kind"] == "sentencepiece":
    if not sp_path.is_file():
      raise tok.TokenizerError(f"{workdir}'s config.json names {sp_path.name}, which is missing.")
    info = tok.sentencepiece_info(sp_path)
    tok.check_vocab(cfg.vocab_size, info["vocab_size"], str(sp_path))
    ids = {k: (info[k] if info[k] >= 0 else None) for k in ("bos_id", "eos_id", "pad_id")}
  hf = hf_config_from_model(cfg, **ids)
  out = pathlib.Path(output_dir)
  out.mkdir(parents=True, exist_ok=True)
  (out / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
  (out / "generation_config.json").write_text(json.dumps(
      {"bos_token_id": ids["bos_id"], "eos_token_id": ids["eos_id"],
       "pad_token_id": ids["pad_id"]}, indent=2) + "\n")
  write_safetensors(out / "model.safetensors", params_to_hf(cfg, params))
  if record["kind"] == "sentencepiece":
    tok.write_hf_sentencepiece_tokenizer(sp_path, out, cfg.max_positions)
  elif record["kind"] == "hf":
    for name in record.get("files", []):
      if (workdir / name).is_file():
        shutil.copyfile(workdir / name, out / name)
  return out
