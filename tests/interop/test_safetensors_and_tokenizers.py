"""safetensors reader/writer and SentencePiece -> tokenizer.json conversion."""

import json
import random
import struct

import ml_dtypes
import numpy as np
import pytest

from tinystories_jax.interop import tokenizer_files as tf
from tinystories_jax.interop.safetensors_io import (SafetensorsError, read_safetensors,
                                                    write_safetensors)


def test_round_trip_all_dtypes(tmp_path):
  tensors = {
      "a": np.arange(12, dtype=np.float32).reshape(3, 4),
      "b": np.ones((2, 2), ml_dtypes.bfloat16),
      "c": np.arange(5, dtype=np.int64),
      "d": np.zeros((0, 3), np.float16),
  }
  write_safetensors(tmp_path / "x.safetensors", tensors)
  back = read_safetensors(tmp_path / "x.safetensors")
  assert set(back) == set(tensors)
  for k, v in tensors.items():
    assert back[k].dtype == v.dtype and back[k].shape == v.shape
    np.testing.assert_array_equal(np.asarray(back[k], np.float64), np.asarray(v, np.float64))


def test_reads_what_the_reference_library_writes(tmp_path):
  st = pytest.importorskip("safetensors.numpy")
  st.save_file({"w": np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32)},
               str(tmp_path / "ref.safetensors"))
  got = read_safetensors(tmp_path / "ref.safetensors")
  np.testing.assert_array_equal(got["w"], st.load_file(str(tmp_path / "ref.safetensors"))["w"])
  write_safetensors(tmp_path / "ours.safetensors", {"w": got["w"]})
  np.testing.assert_array_equal(st.load_file(str(tmp_path / "ours.safetensors"))["w"], got["w"])


@pytest.mark.parametrize("damage,match", [
    (lambda b: b[:4], "too short"),
    (lambda b: b[:20], "header claims"),
    (lambda b: b[:-3], "truncated or corrupt: tensor 'w'"),
    (lambda b: struct.pack("<Q", 4) + b"nope" + b[8:], "not valid JSON"),
])
def test_damaged_files_fail_with_one_sentence(tmp_path, damage, match):
  write_safetensors(tmp_path / "x.safetensors", {"w": np.zeros((4, 4), np.float32)})
  data = (tmp_path / "x.safetensors").read_bytes()
  (tmp_path / "x.safetensors").write_bytes(damage(data))
  with pytest.raises(SafetensorsError, match=match):
    read_safetensors(tmp_path / "x.safetensors")


def test_tokenizer_json_encodes_like_sentencepiece(sp_model):
  tokenizers = pytest.importorskip("tokenizers")
  import sentencepiece as spm  # noqa: PLC0415

  sp = spm.SentencePieceProcessor(model_file=str(sp_model))
  tok = tokenizers.Tokenizer.from_str(json.dumps(tf.sentencepiece_to_tokenizer_json(sp_model)))
  rng = random.Random(0)
  alphabet = "ab cdé\n\t😀,.Ｑ①ﬁ  Lily"
  texts = ["", " ", "Once upon a time, Lily said hi.", "trailing  ", "\u00a0nbsp"] + [
      "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 24))) for _ in range(300)]
  for text in texts:
    ids = sp.encode(text)
    assert tok.encode(text, add_special_tokens=False).ids == ids, repr(text)
    assert tok.decode(ids) == sp.decode(ids), repr(text)


def test_sentencepiece_info_and_bad_files(sp_model, tmp_path):
  info = tf.sentencepiece_info(sp_model)
  assert info == {"vocab_size": 320, "bos_id": 1, "eos_id": 2, "pad_id": 3, "unk_id": 0}
  (tmp_path / "bad.model").write_bytes(b"\x00\x01garbage")
  with pytest.raises(tf.TokenizerError, match="not a SentencePiece model"):
    tf.sentencepiece_info(tmp_path / "bad.model")
