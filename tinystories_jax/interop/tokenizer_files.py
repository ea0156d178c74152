"""Tokenizers travelling with checkpoints: copying HF tokenizer files, checking vocab sizes,
writing a SentencePiece model as transformers' tokenizer.json and as llama2.c's tokenizer.bin.

Only the `sentencepiece` package is needed (its protobuf reader); nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import struct

HF_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json",
                      "special_tokens_map.json", "added_tokens.json", "tokenizer.model")
GPT_NEO_TOKENIZER = "EleutherAI/gpt-neo-125M"  # the GPT-2 BPE the released models use


class TokenizerError(ValueError):
  """A tokenizer does not fit its model or cannot be converted."""


def hf_tokenizer_files(hf_dir: str | os.PathLike) -> list[str]:
  """Names of the tokenizer files present in an HF model directory."""
  return [n for n in HF_TOKENIZER_FILES if (pathlib.Path(hf_dir) / n).is_file()]


def hf_tokenizer_vocab_size(hf_dir: str | os.PathLike) -> int | None:
  """Number of token ids the HF tokenizer in `hf_dir` can produce (None if it has none)."""
  hf_dir = pathlib.Path(hf_dir)
  if (hf_dir / "tokenizer.json").is_file():
    tok = json.loads((hf_dir / "tokenizer.json").read_text())
    vocab = tok.get("model", {}).get("vocab", {})
    ids = list(vocab.values()) if isinstance(vocab, dict) else list(range(len(vocab)))
    ids += [t["id"] for t in tok.get("added_tokens", [])]
    return max(ids) + 1 if ids else None
  if (hf_dir / "vocab.json").is_file():
    ids = list(json.loads((hf_dir / "vocab.json").read_text()).values())
    if (hf_dir / "added_tokens.json").is_file():
      ids += list(json.loads((hf_dir / "added_tokens.json").read_text()).values())
    return max(ids) + 1 if ids else None
  if (hf_dir / "tokenizer.model").is_file():
    return sentencepiece_info(hf_dir / "tokenizer.model")["vocab_size"]
  return None


def check_vocab(model_vocab: int, tokenizer_vocab: int | None, where: str) -> None:
  """A tokenizer may have fewer ids than the embedding has rows (padding), never more."""
  if tokenizer_vocab is not None and tokenizer_vocab > model_vocab:
    raise TokenizerError(f"the tokenizer in {where} has {tokenizer_vocab} tokens but the model's "
                         f"vocab_size is {model_vocab}; they do not belong together.")


def _load_proto(path: str | os.PathLike):
  from sentencepiece import sentencepiece_model_pb2  # noqa: PLC0415

  proto = sentencepiece_model_pb2.ModelProto()
  try:
    proto.ParseFromString(pathlib.Path(path).read_bytes())
  except Exception:  # protobuf's DecodeError
    raise TokenizerError(f"{path} is not a SentencePiece model.") from None
  if not proto.pieces:
    raise TokenizerError(f"{path} is not a SentencePiece model (it has no pieces).")
  return proto


def sentencepiece_info(path: str | os.PathLike) -> dict:
  """vocab_size and the special ids (-1 when absent) of a SentencePiece model."""
  proto = _load_proto(path)
  spec = proto.trainer_spec
  return {"vocab_size": len(proto.pieces), "bos_id": spec.bos_id, "eos_id": spec.eos_id,
          "pad_id": spec.pad_id, "unk_id": spec.unk_id}


# ------------------------------------------------------------------------------------------------
# SentencePiece -> transformers tokenizer.json

_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


def sentencepiece_to_tokenizer_json(path: str | os.PathLike) -> dict:
  """A `tokenizers` JSON that encodes exactly like `SentencePieceProcessor.encode` for BPE and
  unigram models: the model's own normalizer (NFKC charsmap, whitespace handling, dummy prefix),
  its pieces and, for BPE, merges ranked by piece score."""
  proto = _load_proto(path)
  pieces = proto.pieces
  spec = proto.normalizer_spec
  byte_fallback = proto.trainer_spec.byte_fallback
  unk = pieces[proto.trainer_spec.unk_id].piece if proto.trainer_spec.unk_id >= 0 else None
  model_type = proto.trainer_spec.model_type  # 1 unigram, 2 bpe
  if model_type == 2:
    vocab = {p.piece: i for i, p in enumerate(pieces)}
    normal = {p.piece: (p.score, i) for i, p in enumerate(pieces) if p.type == _NORMAL}
    ranked = []
    for piece, (score, i) in normal.items():
      for cut in range(1, len(piece)):
        left, right = piece[:cut], piece[cut:]
        if left in normal and right in normal:
          ranked.append((-score, i, left, right))
    merges = [[left, right] for _, _, left, right in sorted(ranked)]
    model = {"type": "BPE", "dropout": None, "unk_token": unk, "continuing_subword_prefix": None,
             "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": byte_fallback,
             "ignore_merges": False, "vocab": vocab, "merges": merges}
  elif model_type == 1:
    model = {"type": "Unigram", "unk_id": proto.trainer_spec.unk_id,
             "vocab": [[p.piece, p.score] for p in pieces], "byte_fallback": byte_fallback}
  else:
    raise TokenizerError(f"{path} is a SentencePiece model of type {model_type}; only BPE and "
                         "unigram models convert to tokenizer.json.")
  norms: list[dict] = []
  if spec.precompiled_charsmap:
    import base64  # noqa: PLC0415

    norms.append({"type": "Precompiled",
                  "precompiled_charsmap": base64.b64encode(spec.precompiled_charsmap).decode()})
  if spec.remove_extra_whitespaces:
    norms += [{"type": "Replace", "pattern": {"Regex": r"\A +| +\z"}, "content": ""},
              {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "}]
  if spec.escape_whitespaces:
    norms.append({"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"})
  if spec.add_dummy_prefix:
    # In the normalizer (not Metaspace): Metaspace skips the prefix once leading spaces are gone.
    norms.append({"type": "Prepend", "prepend": "\u2581"})
  user_defined = [p.piece for p in pieces if p.type == _USER_DEFINED]
  pre = None
  if user_defined:
    import re  # noqa: PLC0415

    pattern = "|".join(re.escape(p) for p in sorted(user_defined, key=len, reverse=True))
    pre = {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated",
           "invert": False}
  decoders = [{"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "}]
  if byte_fallback:
    decoders.append({"type": "ByteFallback"})
  decoders.append({"type": "Fuse"})
  if spec.add_dummy_prefix:
    decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
  added = [{"id": i, "content": p.piece, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": False, "special": True}
           for i, p in enumerate(pieces) if p.type in (_CONTROL, _UNKNOWN)]
  bos = proto.trainer_spec.bos_id
  post = None
  if bos >= 0:  # our data frames every story as BOS ... EOS; generation starts after BOS
    bos_piece = pieces[bos].piece
    post = {"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos_piece, "type_id": 0}},
                       {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos_piece, "type_id": 0}},
                     {"Sequence": {"id": "A", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos_piece: {"id": bos_piece, "ids": [bos],
                                           "tokens": [bos_piece]}}}
  return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
          "normalizer": {"type": "Sequence", "normalizers": norms}, "pre_tokenizer": pre,
          "post_processor": post, "decoder": {"type": "Sequence", "decoders": decoders},
          "model": model}


def write_hf_sentencepiece_tokenizer(sp_path: str | os.PathLike, out_dir: str | os.PathLike,
                                     model_max_length: int) -> list[str]:
  """Writes tokenizer.model, tokenizer.json, tokenizer_config.json and special_tokens_map.json."""
  out_dir = pathlib.Path(out_dir)
  info = sentencepiece_info(sp_path)
  proto = _load_proto(sp_path)
  shutil.copyfile(sp_path, out_dir / "tokenizer.model")
  (out_dir / "tokenizer.json").write_text(
      json.dumps(sentencepiece_to_tokenizer_json(sp_path), ensure_ascii=False))
  special = {}
  for key, name in (("bos_id", "bos_token"), ("eos_id", "eos_token"), ("unk_id", "unk_token"),
                    ("pad_id", "pad_token")):
    if info[key] >= 0:
      special[name] = proto.pieces[info[key]].piece
  (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
  config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model_max_length,
            "clean_up_tokenization_spaces": False, **special}
  (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
  return ["tokenizer.model", "tokenizer.json", "tokenizer_config.json",
          "special_tokens_map.json"]


def write_llama2c_tokenizer(sp_path: str | os.PathLike, out_path: str | os.PathLike,
                            vocab_size: int) -> None:
  """llama2.c's tokenizer.bin (as its tokenizer.py writes it): max token length, then per id a
  float32 score, an int32 length and the UTF-8 bytes, with '▁' shown as a space and BOS/EOS as
  '\\n<s>\\n' / '\\n</s>\\n'. Ids past the SentencePiece vocab (embedding padding) get empty
  strings so run.c can read `vocab_size` entries."""
  proto = _load_proto(sp_path)
  spec = proto.trainer_spec
  check_vocab(vocab_size, len(proto.pieces), str(sp_path))
  tokens, scores = [], []
  for i in range(vocab_size):
    if i < len(proto.pieces):
      piece, score = proto.pieces[i].piece, proto.pieces[i].score
    else:
      piece, score = "", 0.0
    if i == spec.bos_id:
      piece = "\n<s>\n"
    elif i == spec.eos_id:
      piece = "\n</s>\n"
    tokens.append(piece.replace("\u2581", " ").encode("utf-8"))
    scores.append(score)
  with open(out_path, "wb") as f:
    f.write(struct.pack("I", max(len(t) for t in tokens)))
    for t, s in zip(tokens, scores):
      f.write(struct.pack("fI", s, len(t)))
      f.write(t)
