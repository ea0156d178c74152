"""SentencePiece tokenizer: training on a story corpus, and the small wrapper the project uses.

The trained model is BPE with byte fallback (no story is ever unencodable), digits split into single
digits, identity normalisation (the cleaned text is already NFC), spaces kept as they are, and the
newline as a piece of its own so models learn paragraph breaks. Special ids: ``unk`` 0, ``bos`` 1,
``eos`` 2 (llama2.c's convention, so exported models run in ``run.c``) and ``pad`` 3.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import re
from collections.abc import Iterable, Sequence

import sentencepiece as spm

from tinystories_jax.data.errors import DataError

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
NEWLINE = "\n"
# Stories are single SentencePiece "sentences"; they must fit whole.
_MAX_STORY_BYTES = 1 << 16


def train_sentencepiece(stories: Iterable[str], *, vocab_size: int, num_threads: int = 0) -> bytes:
  """Trains a BPE SentencePiece model on ``stories`` and returns the serialised model.

  Training is deterministic for the same stories in the same order (the caller samples them
  with a seeded generator; SentencePiece is told not to sample or shuffle on its own).

  Args:
    stories: the training texts (a bounded sample of the corpus).
    vocab_size: the number of pieces, special ids and the 256 byte pieces included.
    num_threads: trainer threads; 0 means every core.

  Raises:
    DataError: the vocab size does not fit the corpus (too large for the text, or too small for
      the characters and byte pieces it must hold).
  """
  texts = [s for s in stories if s]
  if not texts:
    raise DataError("there is no text to train the tokenizer on: the corpus is empty after cleaning.")
  min_vocab = 256 + 4 + 1
  if vocab_size < min_vocab:
    raise DataError(f"--vocab_size={vocab_size} is too small: byte fallback alone needs {min_vocab} "
                    f"pieces; use at least {min_vocab} (512 or more leaves room for words).")
  model = _ModelBuffer()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        split_digits=True,
        character_coverage=0.99995,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        allow_whitespace_only_pieces=True,
        user_defined_symbols=[NEWLINE],
        unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        max_sentence_length=_MAX_STORY_BYTES,
        num_threads=num_threads or os.cpu_count() or 1,
        minloglevel=2,
    )
  except RuntimeError as e:
    raise DataError(_explain_trainer_error(str(e), vocab_size)) from e
  return model.data


class _ModelBuffer:
  """Receives the trained model from SentencePiece (it calls ``write``)."""

  def __init__(self):
    self.data = b""

  def write(self, data: bytes) -> None:
    self.data += data


def _explain_trainer_error(message: str, vocab_size: int) -> str:
  high = re.search(r"Vocabulary size (?:is )?too high \((\d+)\)\. Please set it to a value <= (\d+)",
                   message)
  if high:
    return (f"--vocab_size={vocab_size} is more than this corpus supports (at most {high.group(2)} "
            "pieces): lower --vocab_size or add more text.")
  low = re.search(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)", message)
  if low:
    return (f"--vocab_size={vocab_size} cannot hold the corpus's {low.group(2)} distinct characters "
            "and byte pieces: raise --vocab_size.")
  first = message.strip().splitlines()[0] if message.strip() else "no detail"
  return f"SentencePiece could not train a {vocab_size}-piece tokenizer ({first}): check the corpus."


class Tokenizer:
  """A loaded SentencePiece model with the project's special ids and story framing."""

  def __init__(self, model: bytes | str | os.PathLike[str]):
    if isinstance(model, (str, os.PathLike)):
      path = pathlib.Path(model)
      try:
        model = path.read_bytes()
      except OSError as e:
        raise DataError(f"cannot read the tokenizer {path} ({e.strerror or e}): check the path.") from e
    self.serialized: bytes = model
    self.sp = spm.SentencePieceProcessor()
    try:
      self.sp.LoadFromSerializedProto(model)
    except RuntimeError as e:
      raise DataError("the tokenizer file is not a SentencePiece model: pass a .model file "
                      "written by `prepare` or SentencePiece.") from e
    self.sha256 = hashlib.sha256(model).hexdigest()

  @property
  def vocab_size(self) -> int:
    return self.sp.GetPieceSize()

  def same_as(self, other: "Tokenizer") -> bool:
    """Whether both give every id the same piece and the same special ids (the same file, or
    one saved again)."""
    if self.sha256 == other.sha256:
      return True
    ids = lambda t: (t.vocab_size, t.bos_id, t.eos_id, t.pad_id, t.unk_id)  # noqa: E731
    return ids(self) == ids(other) and all(
        self.sp.IdToPiece(i) == other.sp.IdToPiece(i) for i in range(self.vocab_size))

  @property
  def bos_id(self) -> int:
    return self.sp.bos_id()

  @property
  def eos_id(self) -> int:
    return self.sp.eos_id()

  @property
  def pad_id(self) -> int:
    return self.sp.pad_id()

  @property
  def unk_id(self) -> int:
    return self.sp.unk_id()

  def encode(self, text: str) -> list[int]:
    """Encodes text without story framing (a prompt, say)."""
    return self.sp.EncodeAsIds(text)

  def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[list[int]]:
    """Encodes many texts, on ``num_threads`` SentencePiece threads."""
    return self.sp.Encode(list(texts), out_type=int, num_threads=num_threads)

  def frame(self, ids: list[int]) -> list[int]:
    """Wraps one story's ids as BOS ... EOS, so a model learns where stories start and end."""
    return [self.bos_id, *ids, self.eos_id]

  def decode(self, ids: Sequence[int]) -> str:
    """Decodes ids to text; special ids (BOS, EOS, pad) decode to nothing."""
    return self.sp.DecodeIds([int(i) for i in ids])

  def id_to_piece(self, i: int) -> str:
    return self.sp.IdToPiece(int(i))

  def save(self, path: str | os.PathLike[str]) -> None:
    pathlib.Path(path).write_bytes(self.serialized)
