"""`prepare`: raw story files -> cleaned text -> SentencePiece tokenizer -> token shards.

The output directory (see docs/architecture.md) holds ``tokenizer.model``, one flat token file and
one offsets file per split, ``cleaning_stats.json`` and, written last, ``metadata.json``. Every file
is written under a temporary name and renamed when whole, so an interrupted run never leaves a file
that looks finished; a rerun with the same inputs and options reuses what is already done (the
cleaned text, the tokenizer, or everything), and a directory prepared from other inputs or with
another tokenizer is refused rather than mixed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import multiprocessing
import os
import pathlib
import random
import shutil
import sys
from collections.abc import Iterable, Iterator

import numpy as np
import tqdm

from tinystories_jax.data import clean as clean_lib
from tinystories_jax.data import stories as stories_lib
from tinystories_jax.data import synthetic
from tinystories_jax.data import tokenizer as tokenizer_lib
from tinystories_jax.data.errors import DataError

FORMAT_VERSION = 1
SYNTHETIC = "synthetic"
SPLITS = ("train", "valid")
_CHUNK = 512  # stories per worker task: big enough to amortise pickling, small for the progress bar

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PrepareOptions:
  """What `prepare` does; mirrors the entry point's flags (see BUILD.md)."""

  inputs: str
  output_dir: str
  valid_inputs: str | None = None
  valid_fraction: float | None = None  # None: 0.01 unless valid_inputs are given
  vocab_size: int | None = None
  tokenizer: str | None = None
  seed: int = 0
  num_workers: int = 0
  min_words: int = 5
  dedupe: bool = True
  tokenizer_sample_stories: int = 200_000
  synthetic_stories: int = 20_000
  keep_clean_text: bool = False
  overwrite: bool = False

  def __post_init__(self):
    if self.valid_fraction is None:
      object.__setattr__(self, "valid_fraction", 0.0 if self.valid_inputs else 0.01)

  def validate(self) -> None:
    if not 0.0 <= self.valid_fraction < 1.0:
      raise DataError(f"--valid_fraction={self.valid_fraction} must be in [0, 1): e.g. 0.01.")
    if self.valid_inputs and self.valid_fraction:
      raise DataError("pass either --valid_input or --valid_fraction, not both.")
    if self.tokenizer_sample_stories < 1:
      raise DataError("--tokenizer_sample_stories must be at least 1.")
    if self.synthetic_stories < 1:
      raise DataError("--synthetic_stories must be at least 1.")


def _sha256_file(path: pathlib.Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(1 << 20):
      h.update(chunk)
  return h.hexdigest()


def _atomic_write_bytes(path: pathlib.Path, data: bytes) -> None:
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_bytes(data)
  os.replace(tmp, path)


def _atomic_write_json(path: pathlib.Path, obj) -> None:
  _atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def _read_json(path: pathlib.Path):
  try:
    return json.loads(path.read_text())
  except (OSError, json.JSONDecodeError):
    return None


@dataclasses.dataclass
class _SplitSource:
  """Where a split's raw stories come from."""

  name: str
  files: list[pathlib.Path]
  records: list[dict]  # name + sha256 + bytes of each input, for metadata and fingerprints


def _describe_inputs(spec: str, opts: PrepareOptions) -> tuple[list[pathlib.Path], list[dict]]:
  if spec == SYNTHETIC:
    return [], [{"name": SYNTHETIC, "stories": opts.synthetic_stories, "seed": opts.seed,
                 "generator_version": synthetic.GENERATOR_VERSION}]
  files = stories_lib.resolve(spec)
  records = []
  for f in files:
    try:
      records.append({"name": str(f), "bytes": f.stat().st_size, "sha256": _sha256_file(f)})
    except OSError as e:
      raise DataError(f"cannot read {f} ({e.strerror or e}): check the file.") from e
  return files, records


def _raw_stories(spec: str, files: list[pathlib.Path], opts: PrepareOptions) -> Iterator[str]:
  if spec == SYNTHETIC:
    yield from synthetic.generate(opts.synthetic_stories, seed=opts.seed)
  else:
    for story in stories_lib.iter_stories(files):
      yield story.text


def _in_valid(text: str, seed: int, fraction: float) -> bool:
  """A stable, order-independent split: the same story always lands on the same side."""
  digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8, key=str(seed).encode()).digest()
  return int.from_bytes(digest, "little") / 2**64 < fraction


def _chunks(items: Iterable, size: int) -> Iterator[list]:
  chunk = []
  for item in items:
    chunk.append(item)
    if len(chunk) == size:
      yield chunk
      chunk = []
  if chunk:
    yield chunk


# Worker-process state and tasks (module level so that spawned workers can import them).
_WORKER: dict = {}
# Below this much input a process pool costs more to start than it saves.
_POOL_MIN_BYTES = 16 << 20


def _init_worker(min_words: int) -> None:
  _WORKER["cleaner"] = clean_lib.Cleaner(min_words=min_words, dedupe=False)


def _clean_chunk(texts: list[str]) -> list[tuple[str | None, tuple[str, ...]]]:
  cleaner = _WORKER["cleaner"]
  return [cleaner.clean_text(t) for t in texts]


def _encode_chunk(task: tuple[str, str, list[str]]) -> tuple[np.ndarray, np.ndarray]:
  path, sha, texts = task
  tok = _WORKER.get("tokenizer")
  if tok is None or tok.sha256 != sha:
    tok = _WORKER["tokenizer"] = tokenizer_lib.Tokenizer(path)
  ids = tok.encode_batch(texts)
  lengths = np.fromiter((len(x) + 2 for x in ids), dtype=np.int64, count=len(ids))
  flat = np.empty(int(lengths.sum()), dtype=np.int32)
  pos = 0
  for x in ids:
    flat[pos] = tok.bos_id
    flat[pos + 1:pos + 1 + len(x)] = x
    flat[pos + 1 + len(x)] = tok.eos_id
    pos += len(x) + 2
  return flat, lengths


@contextlib.contextmanager
def _pool(num_workers: int, min_words: int):
  """Yields a ``map`` over worker processes, or the built-in one for a single worker."""
  if num_workers <= 1:
    _init_worker(min_words)
    yield map
    return
  # spawn, not fork: the calling process may hold threads (jax's, in tests) that fork would copy.
  ctx = multiprocessing.get_context("spawn")
  with ctx.Pool(num_workers, initializer=_init_worker, initargs=(min_words,)) as pool:
    yield lambda fn, it: pool.imap(fn, it)


def _progress(desc: str, unit: str = "stories"):
  return tqdm.tqdm(desc=desc, unit=unit, unit_scale=True, disable=None, file=sys.stderr,
                   dynamic_ncols=True)


class Preparer:
  """Runs the stages of `prepare` for one output directory."""

  def __init__(self, opts: PrepareOptions):
    opts.validate()
    self.opts = opts
    self.out = pathlib.Path(opts.output_dir)
    self.workers = opts.num_workers or os.cpu_count() or 1
    self._retire_metadata = False  # an --overwrite run's old metadata.json, still in place

  # -- fingerprints -------------------------------------------------------------------------

  def _fingerprint(self, sources: list[_SplitSource], tokenizer_sha: str | None) -> str:
    o = self.opts
    payload = {
        "format": FORMAT_VERSION,
        "inputs": {s.name: s.records for s in sources},
        "valid_fraction": o.valid_fraction, "seed": o.seed, "min_words": o.min_words,
        "dedupe": o.dedupe, "clean_version": clean_lib.CLEAN_VERSION,
        "tokenizer": tokenizer_sha or {"vocab_size": o.vocab_size,
                                       "sample": o.tokenizer_sample_stories},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

  # -- stages -------------------------------------------------------------------------------

  def run(self) -> dict:
    """Prepares the directory and returns its metadata."""
    o = self.opts
    given_tok = tokenizer_lib.Tokenizer(o.tokenizer) if o.tokenizer else None
    if given_tok is not None and o.vocab_size and o.vocab_size != given_tok.vocab_size:
      raise DataError(f"--vocab_size={o.vocab_size} disagrees with the tokenizer {o.tokenizer} "
                      f"({given_tok.vocab_size} pieces): drop --vocab_size or pass the right one.")
    if given_tok is not None and min(given_tok.bos_id, given_tok.eos_id) < 0:
      raise DataError(
          f"the tokenizer {o.tokenizer} has no beginning- or end-of-story piece (bos_id="
          f"{given_tok.bos_id}, eos_id={given_tok.eos_id}), and every story is framed BOS ... "
          "EOS: train it with bos_id and eos_id set, or drop --tokenizer to train one here.")
    train_files, train_records = _describe_inputs(o.inputs, o)
    sources = [_SplitSource("train", train_files, train_records)]
    if o.valid_inputs:
      valid_files, valid_records = _describe_inputs(o.valid_inputs, o)
      sources.append(_SplitSource("valid", valid_files, valid_records))
    fingerprint = self._fingerprint(sources, given_tok.sha256 if given_tok else None)

    existing = _read_json(self.out / "metadata.json")
    if existing is not None:
      if existing.get("fingerprint") == fingerprint and self._outputs_present(existing):
        log.info("%s is already prepared from these inputs; reusing it.", self.out)
        return existing
      if not o.overwrite:
        raise DataError(
            f"{self.out} already holds token shards prepared from other inputs or with another "
            "tokenizer (its metadata.json differs): choose a new --output_dir or pass --overwrite.")
      # Retired only once a new tokenizer or shard is about to be written: an --overwrite run
      # that fails before that (an impossible vocabulary, an empty corpus) leaves the old
      # directory as it was.
      self._retire_metadata = True
    self.out.mkdir(parents=True, exist_ok=True)

    input_bytes = sum(r.get("bytes", r.get("stories", 0) * 600) for s in sources for r in s.records)
    workers = self.workers if input_bytes >= _POOL_MIN_BYTES else 1
    with _pool(workers, o.min_words) as self.pmap:
      return self._run_stages(sources, fingerprint, given_tok)

  def _retire_old_metadata(self) -> None:
    if self._retire_metadata:
      (self.out / "metadata.json").unlink(missing_ok=True)
      self._retire_metadata = False

  def _run_stages(self, sources, fingerprint, given_tok) -> dict:
    o = self.opts
    stats, sample = self._clean_all(sources, fingerprint)
    tok = given_tok or self._tokenizer(sample, fingerprint)
    self._retire_old_metadata()
    tok_path = self.out / "tokenizer.model"
    if not tok_path.is_file() or tok_path.read_bytes() != tok.serialized:
      _atomic_write_bytes(tok_path, tok.serialized)
    dtype = np.uint16 if tok.vocab_size <= 2**16 else np.uint32
    splits = {}
    for name in SPLITS:
      splits[name] = self._encode_split(name, tok, dtype)
    cleaning = {name: stats[name] for name in SPLITS}
    _atomic_write_json(self.out / "cleaning_stats.json", cleaning)
    metadata = {
        "format_version": FORMAT_VERSION,
        "fingerprint": fingerprint,
        "vocab_size": tok.vocab_size,
        # pad_id: the id padding slots hold (always masked); the tokenizer's own pad piece, or
        # its EOS where it has none (llama2.c's tokenizer), never -1, which no embedding row has.
        "bos_id": tok.bos_id, "eos_id": tok.eos_id,
        "pad_id": tok.pad_id if tok.pad_id >= 0 else tok.eos_id, "unk_id": tok.unk_id,
        "token_dtype": np.dtype(dtype).name,
        "tokenizer": {"file": "tokenizer.model", "sha256": tok.sha256,
                      "trained_here": given_tok is None, "source": o.tokenizer},
        "inputs": {s.name: s.records for s in sources},
        "valid_fraction": o.valid_fraction,
        "seed": o.seed,
        "splits": splits,
        "cleaning": cleaning,
    }
    _atomic_write_json(self.out / "metadata.json", metadata)
    if not o.keep_clean_text:
      shutil.rmtree(self.out / "clean", ignore_errors=True)
    for name in SPLITS:
      s = splits[name]
      log.info("%s: %d stories, %d tokens, %.2f bytes of text per token", name, s["stories"],
               s["tokens"], s["text_bytes"] / max(1, s["tokens"]))
    log.info("cleaning: %s", json.dumps(cleaning))
    return metadata

  def _outputs_present(self, metadata: dict) -> bool:
    names = ["tokenizer.model"] + [f for s in metadata.get("splits", {}).values()
                                   for f in (s.get("tokens_file"), s.get("offsets_file"))]
    return all(n and (self.out / n).is_file() for n in names)

  def _clean_all(self, sources: list[_SplitSource], fingerprint: str):
    """Cleans every split into clean/<split>.jsonl (or reuses it) and samples tokenizer text."""
    o = self.opts
    clean_dir = self.out / "clean"
    marker = clean_dir / "done.json"
    done = _read_json(marker)
    if done is None or done.get("fingerprint") != fingerprint:
      clean_dir.mkdir(parents=True, exist_ok=True)
      cleaner = clean_lib.Cleaner(min_words=o.min_words, dedupe=o.dedupe)
      stats = {}
      handles = {n: open(clean_dir / f"{n}.jsonl.tmp", "w", encoding="utf-8") for n in SPLITS}
      counts = dict.fromkeys(SPLITS, 0)
      try:
        with _progress("cleaning") as bar:
          pmap = self.pmap
          for source in sources:
            spec = o.inputs if source.name == "train" else o.valid_inputs
            cleaner.counts.clear()
            raw = _raw_stories(spec, source.files, o)
            for results in pmap(_clean_chunk, _chunks(raw, _CHUNK)):
              for text, reasons in results:
                text = cleaner.admit(text, reasons)
                if text is None:
                  continue
                split = source.name
                if split == "train" and o.valid_fraction and _in_valid(text, o.seed, o.valid_fraction):
                  split = "valid"
                handles[split].write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
                counts[split] += 1
              bar.update(len(results))
            stats[source.name] = cleaner.stats()
      finally:
        for h in handles.values():
          h.close()
      if "valid" not in stats:
        stats["valid"] = {"input": 0, "kept": counts["valid"],
                          "note": f"split from the training input (valid_fraction={o.valid_fraction})"}
        stats["train"]["kept_after_valid_split"] = counts["train"]
      if counts["train"] == 0:
        raise DataError("the corpus is empty after cleaning (no story kept): check --input and the "
                        f"cleaning counts {json.dumps(stats['train'])}.")
      if counts["valid"] == 0:
        total = counts["train"]
        enough = min(0.5, max(0.01, 5 / max(total, 1)))
        raise DataError(
            f"the validation split is empty ({total} stories, --valid_fraction="
            f"{o.valid_fraction} held out none): pass --valid_input=PATHS or a --valid_fraction "
            f"that keeps a few stories of {total} (e.g. {enough:.2g}).")
      for n in SPLITS:
        os.replace(clean_dir / f"{n}.jsonl.tmp", clean_dir / f"{n}.jsonl")
      _atomic_write_json(marker, {"fingerprint": fingerprint, "stats": stats, "counts": counts})
    else:
      log.info("reusing the cleaned text in %s", clean_dir)
      stats = done["stats"]
    sample = self._sample_for_tokenizer() if not o.tokenizer else []
    return stats, sample

  def _iter_clean(self, split: str) -> Iterator[str]:
    with open(self.out / "clean" / f"{split}.jsonl", encoding="utf-8") as f:
      for line in f:
        yield json.loads(line)["text"]

  def _sample_for_tokenizer(self) -> list[str]:
    """A seeded reservoir sample of the training split (all of it when small enough)."""
    k = self.opts.tokenizer_sample_stories
    rng = random.Random(self.opts.seed)
    sample: list[str] = []
    for i, text in enumerate(self._iter_clean("train")):
      if i < k:
        sample.append(text)
      else:
        j = rng.randint(0, i)
        if j < k:
          sample[j] = text
    return sample

  def _tokenizer(self, sample: list[str], fingerprint: str) -> tokenizer_lib.Tokenizer:
    path, meta_path = self.out / "tokenizer.model", self.out / "tokenizer.meta.json"
    meta = _read_json(meta_path)
    if meta is not None and meta.get("fingerprint") == fingerprint and path.is_file():
      tok = tokenizer_lib.Tokenizer(path)
      if tok.sha256 == meta.get("sha256"):
        log.info("reusing the tokenizer %s", path)
        return tok
    vocab_size = self.opts.vocab_size or 4096
    log.info("training a %d-piece SentencePiece tokenizer on %d stories", vocab_size, len(sample))
    model = tokenizer_lib.train_sentencepiece(sample, vocab_size=vocab_size,
                                              num_threads=self.workers)
    tok = tokenizer_lib.Tokenizer(model)
    self._retire_old_metadata()
    _atomic_write_bytes(path, model)
    _atomic_write_json(meta_path, {"fingerprint": fingerprint, "sha256": tok.sha256,
                                   "vocab_size": vocab_size, "sample_stories": len(sample)})
    return tok

  def _encode_split(self, split: str, tok: tokenizer_lib.Tokenizer, dtype) -> dict:
    tokens_name, offsets_name = f"{split}.tokens", f"{split}.offsets.npy"
    tokens_tmp = self.out / (tokens_name + ".tmp")
    offsets = [np.zeros(1, np.int64)]
    total, stories, text_bytes = 0, 0, 0
    digest = hashlib.sha256()
    tok_path = str((self.out / "tokenizer.model").resolve())
    with open(tokens_tmp, "wb") as f, _progress(f"encoding {split}") as bar:
      texts = self._iter_clean(split)

      def tasks(chunks):
        nonlocal text_bytes
        for chunk in chunks:
          text_bytes += sum(len(t.encode("utf-8")) for t in chunk)
          yield tok_path, tok.sha256, chunk

      for flat, lengths in self.pmap(_encode_chunk, tasks(_chunks(texts, _CHUNK))):
        data = flat.astype(dtype).tobytes()
        f.write(data)
        digest.update(data)
        offsets.append(total + np.cumsum(lengths))
        total += int(lengths.sum())
        stories += len(lengths)
        bar.update(len(lengths))
    offsets_arr = np.concatenate(offsets)
    offsets_tmp = self.out / (offsets_name + ".tmp.npy")
    np.save(offsets_tmp, offsets_arr)
    os.replace(tokens_tmp, self.out / tokens_name)
    os.replace(offsets_tmp, self.out / offsets_name)
    return {"stories": stories, "tokens": total, "text_bytes": text_bytes,
            "tokens_file": tokens_name, "offsets_file": offsets_name,
            "tokens_sha256": digest.hexdigest()}


def prepare(opts: PrepareOptions) -> dict:
  """Prepares ``opts.output_dir`` (see the module docstring) and returns its metadata."""
  return Preparer(opts).run()
