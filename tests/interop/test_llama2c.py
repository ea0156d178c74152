"""llama2.c export, checked with a numpy port of run.c's forward pass."""

import numpy as np
import pytest
from flax import nnx

from tinystories_jax import models
from tinystories_jax.interop import llama2c, workdir as wd
from tinystories_jax.models.config import ModelConfig
from . import run_c


def _workdir(tmp_path, cfg, sp_model=None, seed=0):
  model = models.build(cfg, nnx.Rngs(seed))
  # Random norm scales, so a mix-up between the two norms of a block would show.
  for block in model.blocks:
    for norm in (block.norm1, block.norm2):
      norm.scale[...] = np.random.default_rng(seed).uniform(0.5, 1.5, cfg.d_model)
  files = {"tokenizer.model": str(sp_model)} if sp_model else {}
  tokenizer = {"kind": "sentencepiece", "path": "tokenizer.model"} if sp_model else {
      "kind": "none"}
  wd.write_workdir(tmp_path / "wd", cfg, wd.model_params(model), tokenizer=tokenizer,
                   files=files)
  return model


@pytest.mark.parametrize("kv_heads,tied", [(2, True), (4, False)], ids=["gqa-tied", "untied"])
def test_run_c_computes_our_logits(tmp_path, kv_heads, tied):
  cfg = ModelConfig(family="llama", vocab_size=67, d_model=32, num_layers=2, num_heads=4,
                    num_kv_heads=kv_heads, multiple_of=8, max_positions=16,
                    tie_embeddings=tied, attention_impl="xla")
  model = _workdir(tmp_path, cfg)
  llama2c.export_llama2c(tmp_path / "wd", tmp_path / "model.bin")
  c_cfg, weights = run_c.read_checkpoint(tmp_path / "model.bin")
  assert (c_cfg["dim"], c_cfg["hidden"], c_cfg["n_kv"], c_cfg["seq_len"]) == (32, 88, kv_heads,
                                                                              16)
  tokens = np.random.default_rng(0).integers(0, 67, 12)
  want = np.asarray(model(tokens[None]))[0]
  np.testing.assert_allclose(run_c.forward_all(c_cfg, weights, tokens), want, atol=1e-4)
  assert not (tmp_path / "tokenizer.bin").exists()  # the workdir has no SentencePiece model


def test_tokenizer_bin_follows_llama2c(tmp_path, sp_model):
  import sentencepiece as spm  # noqa: PLC0415

  cfg = ModelConfig(family="llama", vocab_size=328, d_model=16, num_layers=1, num_heads=2)
  _workdir(tmp_path, cfg, sp_model)
  llama2c.export_llama2c(tmp_path / "wd", tmp_path / "out" / "m.bin")
  sp = spm.SentencePieceProcessor(model_file=str(sp_model))
  max_len, tokens, scores = run_c.read_tokenizer(tmp_path / "out" / "tokenizer.bin", 328)
  assert tokens[1] == b"\n<s>\n" and tokens[2] == b"\n</s>\n"
  assert max_len == max(len(t) for t in tokens)
  for i in range(4, 320):
    assert tokens[i] == sp.id_to_piece(i).replace("\u2581", " ").encode()
    assert scores[i] == pytest.approx(sp.get_score(i))
  assert tokens[320:] == [b""] * 8  # embedding rows past the tokenizer (padding)


def test_gpt_neo_and_unsupported_shapes_are_refused(tmp_path):
  cfg = ModelConfig(family="gpt_neo", vocab_size=50, d_model=16, num_layers=2, num_heads=2,
                    max_positions=32)
  _ = models.build(cfg, nnx.Rngs(0))
  wd.write_workdir(tmp_path / "neo", cfg, wd.model_params(models.build(cfg, nnx.Rngs(0))),
                   tokenizer={"kind": "none"})
  with pytest.raises(llama2c.Llama2cError, match="export-hf"):
    llama2c.export_llama2c(tmp_path / "neo", tmp_path / "x.bin")
  cfg = ModelConfig(family="llama", vocab_size=50, d_model=16, num_layers=1, num_heads=2,
                    rope_theta=500000.0)
  wd.write_workdir(tmp_path / "theta", cfg, wd.model_params(models.build(cfg, nnx.Rngs(0))),
                   tokenizer={"kind": "none"})
  with pytest.raises(llama2c.Llama2cError, match="theta"):
    llama2c.export_llama2c(tmp_path / "theta", tmp_path / "x.bin")
