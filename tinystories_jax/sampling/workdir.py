"""Loading a workdir for inference: model config, latest parameters and the tokenizer.

Works on both kinds of workdir: a training run's (config.json from the trainer, checkpoints with
params + optimizer state, tokenizer.model copied from the data) and one written by
`interop import-*` (params only; SentencePiece or Hugging Face tokenizer files). Only the
"params" item of a checkpoint is read (`tinystories_jax.interop.workdir.read_workdir`).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Protocol

import jax
import orbax.checkpoint as ocp
from flax import nnx

from tinystories_jax import models
from tinystories_jax.data.errors import DataError
from tinystories_jax.data.tokenizer import Tokenizer
from tinystories_jax.interop import workdir as interop_workdir
from tinystories_jax.interop.hf import workdir_tokenizer
from tinystories_jax.models.config import DTYPES, ModelConfig
from tinystories_jax.sampling.config import SamplerError


class TextTokenizer(Protocol):
  """What sampling needs of a tokenizer."""
  bos_id: int
  eos_id: int

  def encode(self, text: str) -> list[int]: ...

  def decode(self, ids: list[int]) -> str: ...


class _SentencePiece:
  """The project's SentencePiece tokenizer (special ids from the model file)."""

  def __init__(self, path: pathlib.Path):
    try:
      self._tok = Tokenizer(path)
    except DataError as e:
      raise SamplerError(str(e)) from None
    self.bos_id, self.eos_id = self._tok.bos_id, self._tok.eos_id
    self.kind = "sentencepiece"

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text)

  def decode(self, ids) -> str:
    return self._tok.decode(ids)


class _HuggingFace:
  """A `transformers` tokenizer from the workdir's files (GPT-Neo's GPT-2 BPE, say)."""

  def __init__(self, workdir: pathlib.Path, record: dict):
    try:
      from transformers import AutoTokenizer  # noqa: PLC0415
    except ImportError:
      raise SamplerError(
          f"{workdir} carries a Hugging Face tokenizer, which needs the `transformers` package; "
          "install it (pip install transformers) and run again.") from None
    if record.get("note"):
      raise SamplerError(f"{workdir} {record['note']}")
    try:
      self._tok = AutoTokenizer.from_pretrained(str(workdir), local_files_only=True)
    except (OSError, ValueError) as e:
      raise SamplerError(f"the tokenizer files in {workdir} could not be loaded "
                         f"({str(e).splitlines()[0]}); copy the model's tokenizer files there."
                         ) from None
    eos = record.get("eos_id", self._tok.eos_token_id)
    bos = record.get("bos_id", self._tok.bos_token_id)
    if eos is None:
      raise SamplerError(f"{workdir}'s tokenizer has no end-of-text token; sampling needs one to "
                         "know where a story ends.")
    # GPT-Neo's stories are separated by one <|endoftext|>: it also marks where a story starts.
    self.bos_id, self.eos_id = int(eos if bos is None else bos), int(eos)
    self.kind = "hf"

  def encode(self, text: str) -> list[int]:
    return list(self._tok.encode(text, add_special_tokens=False))

  def decode(self, ids) -> str:
    return self._tok.decode(list(ids), skip_special_tokens=True)


@dataclasses.dataclass
class LoadedModel:
  """A workdir ready to sample from.

  Attributes:
    model: the `CausalLM` with the checkpoint's parameters.
    cfg: its config (with the dtype and attention implementation chosen for inference).
    tokenizer: encodes prompts, decodes stories.
    step: the checkpoint step read.
    workdir: the workdir's absolute path.
    name: "<workdir as given>@<step>", what completions record as `model`.
  """
  model: nnx.Module
  cfg: ModelConfig
  tokenizer: TextTokenizer
  step: int
  workdir: pathlib.Path
  name: str


def inference_dtype(saved: str, requested: str) -> str:
  """"auto" keeps the saved compute dtype on accelerators and uses float32 on the CPU, where it
  is exact (bfloat16 reads half the weight bytes, which helps at batch 1: docs/sampling.md)."""
  if requested != "auto":
    if requested not in DTYPES:
      raise SamplerError(f"dtype {requested!r} is not one of {('auto',) + DTYPES}.")
    return requested
  return "float32" if jax.default_backend() == "cpu" else saved


def load(workdir: str | os.PathLike, *, step: int | None = None, dtype: str = "auto",
         attention_impl: str = "auto") -> LoadedModel:
  """Reads a workdir's model and tokenizer for sampling.

  Args:
    workdir: written by `train` or `interop import-*`.
    step: checkpoint step; None means the latest.
    dtype: compute dtype ("auto": see `inference_dtype`).
    attention_impl: prefill attention implementation (the trainer's choice may not exist here).

  Raises:
    SamplerError: the workdir, its checkpoint or its tokenizer is missing or unreadable.
  """
  given = str(workdir)
  path = pathlib.Path(workdir).absolute()
  if not path.is_dir():
    raise SamplerError(f"workdir {given} does not exist; pass the --workdir of a training run or "
                       "of `interop import-*`.")
  try:
    interop_workdir.read_config(path)  # a clear error before touching checkpoints
    if step is None:
      step = _latest_step(path)
    saved_cfg, params, config = interop_workdir.read_workdir(path, step)
  except interop_workdir.WorkdirError as e:
    raise SamplerError(str(e)) from None
  except ValueError as e:  # ModelConfig.from_dict on a config.json from elsewhere
    raise SamplerError(f"{path / 'config.json'} does not describe a model: {e}") from None
  cfg = ModelConfig.from_dict(dict(saved_cfg.to_dict(),
                                   dtype=inference_dtype(saved_cfg.dtype, dtype),
                                   attention_impl=attention_impl))
  abstract = nnx.eval_shape(lambda: models.build(cfg, nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  nnx.replace_by_pure_dict(state, _int_keys(state, params))
  model = nnx.merge(graphdef, state)
  return LoadedModel(model=model, cfg=cfg, tokenizer=load_tokenizer(path, config), step=step,
                     workdir=path, name=f"{given.rstrip('/')}@{step}")


def _latest_step(path: pathlib.Path) -> int:
  ckpt_dir = path / interop_workdir.CHECKPOINTS
  if not ckpt_dir.is_dir():
    raise SamplerError(f"{path} has no {interop_workdir.CHECKPOINTS}/ directory: train first (or "
                       "import a checkpoint), then sample.")
  with ocp.CheckpointManager(ckpt_dir) as mngr:
    step = mngr.latest_step()
  if step is None:
    raise SamplerError(f"{ckpt_dir} holds no finished checkpoint yet; wait for the trainer's "
                       "first save or train longer.")
  return int(step)


def _int_keys(state, params: dict):
  """Orbax stores list indices as strings; the module's state uses ints for `nnx.List` entries."""
  pure = nnx.to_pure_dict(state)

  def match(like, got):
    if not isinstance(like, dict):
      return got
    return {k: match(v, got[str(k)]) for k, v in like.items()}

  return match(pure, params)


def load_tokenizer(workdir: pathlib.Path, config: dict) -> TextTokenizer:
  """The workdir's tokenizer: SentencePiece (trainer, llama imports) or Hugging Face files."""
  record = workdir_tokenizer(workdir, config)
  kind = record.get("kind")
  if kind == "sentencepiece":
    return _SentencePiece(workdir / record.get("path", "tokenizer.model"))
  if kind == "hf":
    return _HuggingFace(workdir, record)
  raise SamplerError(f"{workdir} has no tokenizer (tokenizer.model or Hugging Face tokenizer "
                     "files); copy the tokenizer the model was trained with into it.")
