r"""Input-pipeline and `prepare` throughput.

  python benchmarks/input_pipeline.py [--input=synthetic|PATHS] [--batch_size=128 --seq_len=256]

Prints, for one prepared corpus: tokens/s of the Grain pipeline (fixed windows and packed stories,
in-process and with worker processes), and `prepare`'s cleaning and encoding speed in MB of text
per second per core. With no --input it uses the real samples in ../shared/data/tinystories when
present, else the synthetic corpus.
"""

import json
import os
import pathlib
import sys
import tempfile
import time

from absl import app
from absl import flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from tinystories_jax.data import clean  # noqa: E402
from tinystories_jax.data import pipeline  # noqa: E402
from tinystories_jax.data import preparation  # noqa: E402
from tinystories_jax.data import synthetic  # noqa: E402
from tinystories_jax.data import tokenizer as tokenizer_lib  # noqa: E402

_SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "tinystories"
_INPUT = flags.DEFINE_string("input", None, "Stories to prepare (default: shared samples or "
                             "synthetic).")
_BATCH = flags.DEFINE_integer("batch_size", 128, "Rows per batch.")
_SEQ = flags.DEFINE_integer("seq_len", 256, "Tokens per row.")
_BATCHES = flags.DEFINE_integer("batches", 400, "Batches to time per configuration.")
_BIG_STORIES = flags.DEFINE_integer("big_stories", 60_000,
                                    "Synthetic stories for the prepare-speed corpus.")
_OUT = flags.DEFINE_string("out", None, "Also append the results as JSON lines to this file.")


def _time_iterator(it, batches: int) -> float:
  try:
    for _ in range(5):  # warm-up: worker start, first epoch's shuffle
      next(it)
    tokens = 0
    start = time.perf_counter()
    for _ in range(batches):
      tokens += next(it)["inputs"].size
    return tokens / (time.perf_counter() - start)
  finally:
    it.close()  # stop worker processes now, not at interpreter exit


def main(argv):
  del argv
  spec = _INPUT.value
  if spec is None:
    spec = str(_SHARED / "train.jsonl") if _SHARED.is_dir() else "synthetic"
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    out = pathlib.Path(tmp) / "data"
    start = time.perf_counter()
    preparation.prepare(preparation.PrepareOptions(
        inputs=spec, output_dir=str(out), vocab_size=4096 if spec != "synthetic" else 1024,
        synthetic_stories=20_000, keep_clean_text=True))
    rows.append({"what": "prepare end to end", "seconds": time.perf_counter() - start})

    texts = [json.loads(line)["text"] for line in open(out / "clean" / "train.jsonl")]
    mb = sum(len(t.encode()) for t in texts) / 1e6
    tok = tokenizer_lib.Tokenizer(out / "tokenizer.model")
    start = time.perf_counter()
    tok.encode_batch(texts)
    rows.append({"what": "encode, one core", "mb_per_s": mb / (time.perf_counter() - start),
                 "mb": mb})
    cleaner = clean.Cleaner()
    start = time.perf_counter()
    for t in texts:
      cleaner.clean_text(t)
    rows.append({"what": "clean, one core", "mb_per_s": mb / (time.perf_counter() - start)})

    # prepare's read + clean + encode stages on a corpus big enough for its worker processes,
    # the tokenizer given (nothing trained), with one worker and with one per core.
    big = pathlib.Path(tmp) / "big.jsonl"
    with open(big, "w") as f:
      for text in synthetic.generate(_BIG_STORIES.value, seed=1):
        f.write(json.dumps({"text": text}) + "\n")
    big_mb = big.stat().st_size / 1e6
    for workers in (1, os.cpu_count()):
      start = time.perf_counter()
      preparation.prepare(preparation.PrepareOptions(
          inputs=str(big), output_dir=str(out) + f"-big{workers}", num_workers=workers,
          tokenizer=str(out / "tokenizer.model")))
      seconds = time.perf_counter() - start
      rows.append({"what": f"prepare read+clean+encode, {workers} workers, per core",
                   "mb_per_s": big_mb / seconds / workers, "mb": big_mb})

    for packed in (False, True):
      for workers, threads in ((0, 0), (0, 2), (2, 0)):
        ds = pipeline.train_dataset(out, batch_size=_BATCH.value, seq_len=_SEQ.value, seed=0,
                                    packed=packed, shard_index=0, shard_count=1)
        it = pipeline.make_iterator(ds, worker_count=workers, thread_prefetch=threads)
        rate = _time_iterator(it, _BATCHES.value)
        how = (f"{workers} worker processes" if workers else
               "a prefetch thread" if threads else "in the main thread")
        rows.append({"what": f"pipeline {'packed' if packed else 'windows'}, {how}",
                     "tokens_per_s": rate, "batch": [_BATCH.value, _SEQ.value]})
  print(f"input: {spec}; machine: {os.cpu_count()} cores")
  for r in rows:
    value = (f"{r['tokens_per_s'] / 1e6:8.1f} M tokens/s" if "tokens_per_s" in r else
             f"{r['mb_per_s']:8.2f} MB/s" if "mb_per_s" in r else f"{r['seconds']:8.1f} s")
    print(f"{r['what']:<36} {value}")
  if _OUT.value:
    with open(_OUT.value, "a") as f:
      for r in rows:
        f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
  app.run(main)
