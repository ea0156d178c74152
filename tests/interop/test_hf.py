"""Hugging Face interop against transformers models built locally from random configs."""

import dataclasses
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from flax import nnx  # noqa: E402

from tinystories_jax import models  # noqa: E402
from tinystories_jax.interop import hf, workdir as wd  # noqa: E402
from tinystories_jax.interop.hf_weights import HFError  # noqa: E402
from tinystories_jax.interop.safetensors_io import SafetensorsError  # noqa: E402
from tinystories_jax.interop.tokenizer_files import TokenizerError  # noqa: E402
from tinystories_jax.models.config import ModelConfig  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[2]
TOL = 1e-4


def _save(model, path, safetensors):
  """save_pretrained, or the older layout: a torch.save'd state dict in pytorch_model.bin with
  the attention-mask buffers old transformers versions stored (as in the released TinyStories
  checkpoints; transformers 5 writes neither)."""
  model.save_pretrained(path)
  if not safetensors:
    (pathlib.Path(path) / "model.safetensors").unlink()
    state = dict(model.state_dict())
    if isinstance(model, transformers.GPTNeoForCausalLM):
      n = model.config.max_position_embeddings
      for i in range(model.config.num_layers):
        state[f"transformer.h.{i}.attn.attention.bias"] = torch.tril(
            torch.ones(n, n, dtype=torch.bool)).view(1, 1, n, n)
        state[f"transformer.h.{i}.attn.attention.masked_bias"] = torch.tensor(-1e9)
    torch.save(state, pathlib.Path(path) / "pytorch_model.bin")


def gpt_neo_dir(path, *, safetensors=True, seed=0, **kw):
  torch.manual_seed(seed)
  cfg = dict(vocab_size=97, max_position_embeddings=48, hidden_size=32, num_layers=4,
             num_heads=4, attention_types=[[["global", "local"], 2]], window_size=5,
             bos_token_id=0, eos_token_id=0)
  cfg.update(kw)
  model = transformers.GPTNeoForCausalLM(transformers.GPTNeoConfig(**cfg)).eval()
  _save(model, path, safetensors)
  return model


def llama_dir(path, *, safetensors=True, seed=0, **kw):
  torch.manual_seed(seed)
  cfg = dict(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
             rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
  cfg.update(kw)
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).eval()
  # transformers initialises norm weights to ones; randomise them so a mix-up would show.
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.uniform_(0.5, 1.5)
  _save(model, path, safetensors)
  return model


def torch_logits(model, tokens):
  with torch.no_grad():
    return model(torch.as_tensor(tokens)).logits.float().numpy()


def our_logits(workdir, tokens):
  model, _ = wd.load_model(workdir)
  return np.asarray(nnx.jit(lambda m, t: m(t))(model, tokens))


def tokens_for(vocab, t=24, seed=0):
  return np.random.default_rng(seed).integers(0, vocab, (2, t))


# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("safetensors", [True, False], ids=["safetensors", "pytorch_bin"])
def test_gpt_neo_import_and_export_keep_the_logits(tmp_path, safetensors):
  src = gpt_neo_dir(tmp_path / "hf", safetensors=safetensors)
  tokens = tokens_for(97, t=24)  # longer than the window of 5: the local layers matter
  want = torch_logits(src, tokens)
  hf.import_hf(tmp_path / "hf", tmp_path / "wd")
  np.testing.assert_allclose(our_logits(tmp_path / "wd", tokens), want, atol=TOL)
  config = wd.read_config(tmp_path / "wd")
  assert config["model"]["attention_layers"] == ["global", "local"] * 2
  assert config["model"]["window"] == 5
  assert config["data"]["tokenizer"]["kind"] == "hf"
  assert "GPT-Neo tokenizer" in config["data"]["tokenizer"]["note"]

  hf.export_hf(tmp_path / "wd", tmp_path / "out")
  again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
  assert type(again).__name__ == "GPTNeoForCausalLM"
  np.testing.assert_allclose(torch_logits(again, tokens), want, atol=TOL)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_llama_gqa_import_and_export_keep_the_logits(tmp_path, tied):
  src = llama_dir(tmp_path / "hf", tie_word_embeddings=tied)
  tokens = tokens_for(101)
  want = torch_logits(src, tokens)
  hf.import_hf(tmp_path / "hf", tmp_path / "wd")
  cfg = ModelConfig.from_dict(wd.read_config(tmp_path / "wd")["model"])
  assert (cfg.num_heads, cfg.num_kv_heads, cfg.tie_embeddings) == (4, 2, tied)
  np.testing.assert_allclose(our_logits(tmp_path / "wd", tokens), want, atol=TOL)

  hf.export_hf(tmp_path / "wd", tmp_path / "out")
  again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
  np.testing.assert_allclose(torch_logits(again, tokens), want, atol=TOL)


def test_a_workdir_trained_with_the_norm_kernels_reads_anywhere(tmp_path):
  """A run trained with model.norm, model.qkv and model.mlp "pallas" (GPU kernels) records them;
  the tools reading its workdir on this CPU run the jnp forms, with the same logits."""
  src = llama_dir(tmp_path / "hf")
  tokens = tokens_for(101)
  hf.import_hf(tmp_path / "hf", tmp_path / "wd")
  config_file = tmp_path / "wd" / "config.json"
  config = json.loads(config_file.read_text())
  config["model"].update(norm_impl="pallas", qkv_impl="pallas", mlp_impl="pallas")
  config_file.write_text(json.dumps(config))
  cfg = wd.read_workdir(tmp_path / "wd")[0]
  assert (cfg.norm_impl, cfg.qkv_impl, cfg.mlp_impl) == ("xla", "xla", "xla")
  np.testing.assert_allclose(our_logits(tmp_path / "wd", tokens), torch_logits(src, tokens),
                             atol=TOL)


def test_llama_from_pytorch_bin(tmp_path):
  src = llama_dir(tmp_path / "hf", safetensors=False)
  assert (tmp_path / "hf" / "pytorch_model.bin").is_file()
  tokens = tokens_for(101)
  hf.import_hf(tmp_path / "hf", tmp_path / "wd")
  np.testing.assert_allclose(our_logits(tmp_path / "wd", tokens), torch_logits(src, tokens),
                             atol=TOL)


@pytest.mark.parametrize("family", ["gpt_neo", "llama"])
def test_our_model_exports_with_its_sentencepiece_tokenizer(tmp_path, sp_model, family):
  """A model trained here (SentencePiece vocab) -> transformers: same logits, same tokens."""
  cfg = ModelConfig(family=family, vocab_size=320, d_model=32, num_layers=2, num_heads=4,
                    num_kv_heads=4 if family == "gpt_neo" else 2, max_positions=64, window=6,
                    attention_impl="xla")
  model = models.build(cfg, nnx.Rngs(3))
  wd.write_workdir(tmp_path / "wd", cfg, wd.model_params(model),
                   tokenizer={"kind": "sentencepiece", "path": "tokenizer.model"},
                   files={"tokenizer.model": str(sp_model)}, step=7)
  hf.export_hf(tmp_path / "wd", tmp_path / "out")
  tokens = tokens_for(320, t=20)
  exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
  np.testing.assert_allclose(torch_logits(exported, tokens),
                             np.asarray(nnx.jit(lambda m, t: m(t))(model, tokens)), atol=TOL)
  hf_cfg = json.loads((tmp_path / "out" / "config.json").read_text())
  assert (hf_cfg["bos_token_id"], hf_cfg["eos_token_id"]) == (1, 2)

  import sentencepiece as spm  # noqa: PLC0415

  sp = spm.SentencePieceProcessor(model_file=str(sp_model))
  tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
  for text in ["Once upon a time, Lily said hi.", "  two  spaces\nand a newline", "Café 😀 ①",
               " leading", "ﬁ ＡＢ"]:
    assert tok.encode(text, add_special_tokens=False) == sp.encode(text), text
    assert tok.decode(sp.encode(text)) == sp.decode(sp.encode(text)), text
  assert tok.encode("hi")[0] == sp.bos_id()  # stories start after BOS, as in training


def test_cli_round_trip_and_errors(tmp_path):
  gpt_neo_dir(tmp_path / "hf")
  (tmp_path / "hf" / "tokenizer.json").write_text(json.dumps(
      {"model": {"vocab": {f"t{i}": i for i in range(97)}}, "added_tokens": []}))
  env_cmd = [sys.executable, "-m", "tinystories_jax.interop"]

  def run(*args):
    return subprocess.run(env_cmd + list(args), capture_output=True, text=True, cwd=REPO,
                          env={"PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu",
                               "PATH": "/usr/bin:/bin"})

  r = run("import-hf", f"--hf_dir={tmp_path / 'hf'}", f"--workdir={tmp_path / 'wd'}")
  assert r.returncode == 0, r.stderr
  assert (tmp_path / "wd" / "tokenizer.json").is_file()
  r = run("export-hf", f"--workdir={tmp_path / 'wd'}", f"--output_dir={tmp_path / 'out'}")
  assert r.returncode == 0, r.stderr
  assert (tmp_path / "out" / "tokenizer.json").is_file()
  r = run("import-hf", f"--hf_dir={tmp_path / 'hf'}", f"--workdir={tmp_path / 'wd'}")
  assert r.returncode == 1 and "already holds checkpoints" in r.stderr
  assert "Traceback" not in r.stderr
  r = run("export-llama2c", f"--workdir={tmp_path / 'wd'}", f"--output={tmp_path / 'x.bin'}")
  assert r.returncode == 1 and "export-hf" in r.stderr
  r = run("export-hf", f"--workdir={tmp_path / 'wd'}")
  assert r.returncode != 0 and "--output_dir" in r.stderr


# ------------------------------------------------------------------------------------------------
# bad input: one clear sentence each


def test_another_architecture_is_refused(tmp_path):
  torch.manual_seed(0)
  transformers.GPT2LMHeadModel(transformers.GPT2Config(
      vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2)).save_pretrained(
          tmp_path / "gpt2")
  with pytest.raises(HFError, match=r"'gpt2' model .*GPTNeoForCausalLM and LlamaForCausalLM"):
    hf.import_hf(tmp_path / "gpt2", tmp_path / "wd")


def test_shapes_that_disagree_with_the_config_are_refused(tmp_path):
  gpt_neo_dir(tmp_path / "hf")
  config = json.loads((tmp_path / "hf" / "config.json").read_text())
  config["vocab_size"] = 98
  (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
  with pytest.raises(HFError, match=r"transformer.wte.weight has shape \(97, 32\).*\(98, 32\)"):
    hf.import_hf(tmp_path / "hf", tmp_path / "wd")


def test_missing_tensors_are_refused(tmp_path):
  llama_dir(tmp_path / "hf")
  config = json.loads((tmp_path / "hf" / "config.json").read_text())
  config["num_hidden_layers"] = 3
  (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
  with pytest.raises(HFError, match="lacks tensor"):
    hf.import_hf(tmp_path / "hf", tmp_path / "wd")


def test_truncated_safetensors_is_refused(tmp_path):
  gpt_neo_dir(tmp_path / "hf")
  path = tmp_path / "hf" / "model.safetensors"
  data = path.read_bytes()
  path.write_bytes(data[: len(data) - 1000])
  with pytest.raises(SafetensorsError, match="truncated"):
    hf.import_hf(tmp_path / "hf", tmp_path / "wd")


def test_truncated_pytorch_bin_is_refused(tmp_path):
  gpt_neo_dir(tmp_path / "hf", safetensors=False)
  path = tmp_path / "hf" / "pytorch_model.bin"
  path.write_bytes(path.read_bytes()[:5000])
  with pytest.raises(HFError, match="truncated, corrupt"):
    hf.import_hf(tmp_path / "hf", tmp_path / "wd")


class _NotATensor:
  pass


def test_pickled_objects_are_never_loaded(tmp_path):
  gpt_neo_dir(tmp_path / "hf", safetensors=False)
  torch.save({"transformer.wte.weight": _NotATensor()}, tmp_path / "hf" / "pytorch_model.bin")
  with pytest.raises(HFError, match="weights_only"):
    hf.import_hf(tmp_path / "hf", tmp_path / "wd")


def test_tokenizer_larger_than_the_vocab_is_refused(tmp_path):
  gpt_neo_dir(tmp_path / "hf")
  (tmp_path / "hf" / "tokenizer.json").write_text(json.dumps(
      {"model": {"vocab": {f"t{i}": i for i in range(120)}}, "added_tokens": []}))
  with pytest.raises(TokenizerError, match="120 tokens but the model's vocab_size is 97"):
    hf.import_hf(tmp_path / "hf", tmp_path / "wd")


def test_export_refuses_a_sentencepiece_model_larger_than_the_vocab(tmp_path, sp_model):
  cfg = ModelConfig(family="llama", vocab_size=200, d_model=16, num_layers=1, num_heads=2)
  model = models.build(cfg, nnx.Rngs(0))
  wd.write_workdir(tmp_path / "wd", cfg, wd.model_params(model),
                   tokenizer={"kind": "sentencepiece", "path": "tokenizer.model"},
                   files={"tokenizer.model": str(sp_model)})
  with pytest.raises(TokenizerError, match="320 tokens but the model's vocab_size is 200"):
    hf.export_hf(tmp_path / "wd", tmp_path / "out")


def test_unrepresentable_llama_features_are_refused(tmp_path):
  llama_dir(tmp_path / "hf", attention_bias=True)
  with pytest.raises(HFError, match="attention_bias"):
    hf.import_hf(tmp_path / "hf", tmp_path / "wd")


def test_a_directory_without_weights_or_config_is_refused(tmp_path):
  with pytest.raises(HFError, match="no config.json"):
    hf.import_hf(tmp_path, tmp_path / "wd")
  gpt_neo_dir(tmp_path / "hf")
  (tmp_path / "hf" / "model.safetensors").unlink()
  with pytest.raises(HFError, match="no model.safetensors or pytorch_model.bin"):
    hf.import_hf(tmp_path / "hf", tmp_path / "wd")


def test_llama2c_shaped_import_equals_our_preset(tmp_path):
  """An HF copy of llama2.c's 260K shape imports as exactly our `260k` preset (so the trainer
  can continue training it)."""
  from tinystories_jax.models import presets  # noqa: PLC0415

  preset = presets.llama("260k")
  hf_cfg = hf.hf_config_from_model(preset, bos_id=1, eos_id=2)
  got = hf.model_config_from_hf(hf_cfg)
  assert dataclasses.replace(got, attention_impl=preset.attention_impl) == preset
