r"""Prepares a story corpus for training: clean, train a tokenizer, write token shards.

  python -m tinystories_jax.prepare --input=TinyStoriesV2-GPT4-train.txt \
      --valid_input=TinyStoriesV2-GPT4-valid.txt --output_dir=data/ts-v2-4k --vocab_size=4096

  python -m tinystories_jax.prepare --input=synthetic --output_dir=runs/quickstart-data \
      --vocab_size=1024

See BUILD.md ("prepare") for every flag and the output layout.
"""

import logging
import sys

from absl import app
from absl import flags

from tinystories_jax.data import preparation
from tinystories_jax.data.errors import DataError

_INPUT = flags.DEFINE_string(
    "input", None, "Training stories: comma-separated files, globs, directories or "
    "hf://OWNER/REPO/FILE (.txt with <|endoftext|> lines, .jsonl, .json, .tar.gz, gzip of these); "
    "`synthetic` for the built-in offline corpus.", required=True)
_VALID_INPUT = flags.DEFINE_string("valid_input", None,
                                   "Validation stories, same forms as --input.")
_VALID_FRACTION = flags.DEFINE_float(
    "valid_fraction", None, "Share of the training stories held out for validation "
    "(default 0.01 when --valid_input is not given).")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Directory to write.", required=True)
_VOCAB_SIZE = flags.DEFINE_integer("vocab_size", None,
                                   "Tokenizer vocabulary size when training one (default 4096).")
_TOKENIZER = flags.DEFINE_string("tokenizer", None,
                                 "An existing SentencePiece .model to use instead of training one.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed for the validation split, tokenizer sample and "
                             "synthetic corpus.")
_NUM_WORKERS = flags.DEFINE_integer("num_workers", 0, "Worker processes (0: one per core).")
_MIN_WORDS = flags.DEFINE_integer("min_words", 5, "Drop stories with fewer words than this.")
_DEDUPE = flags.DEFINE_bool("dedupe", True, "Drop exact duplicate stories.")
_TOKENIZER_SAMPLE = flags.DEFINE_integer(
    "tokenizer_sample_stories", 200_000, "Train the tokenizer on at most this many stories "
    "(a seeded sample of the training split).")
_SYNTHETIC_STORIES = flags.DEFINE_integer("synthetic_stories", 20_000,
                                          "Stories to generate for --input=synthetic.")
_KEEP_CLEAN = flags.DEFINE_bool("keep_clean_text", False,
                                "Keep the cleaned text (clean/<split>.jsonl) after encoding.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an output directory prepared from "
                               "other inputs or with another tokenizer.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  logging.getLogger().setLevel(logging.INFO)
  opts = preparation.PrepareOptions(
      inputs=_INPUT.value, valid_inputs=_VALID_INPUT.value, valid_fraction=_VALID_FRACTION.value,
      output_dir=_OUTPUT_DIR.value, vocab_size=_VOCAB_SIZE.value, tokenizer=_TOKENIZER.value,
      seed=_SEED.value, num_workers=_NUM_WORKERS.value, min_words=_MIN_WORDS.value,
      dedupe=_DEDUPE.value, tokenizer_sample_stories=_TOKENIZER_SAMPLE.value,
      synthetic_stories=_SYNTHETIC_STORIES.value, keep_clean_text=_KEEP_CLEAN.value,
      overwrite=_OVERWRITE.value)
  try:
    metadata = preparation.prepare(opts)
  except DataError as e:
    print(f"prepare: {e}", file=sys.stderr)
    sys.exit(2)
  except OSError as e:  # e.g. --output_dir names an existing file, or a read-only place
    print(f"prepare: {e.filename or opts.output_dir}: {e.strerror or e}; check that --output_dir "
          "is a directory this user can write (and the inputs readable).", file=sys.stderr)
    sys.exit(2)
  splits = metadata["splits"]
  print(f"prepared {opts.output_dir}: vocab {metadata['vocab_size']}, "
        + ", ".join(f"{k} {v['stories']} stories / {v['tokens']} tokens" for k, v in splits.items()))


def run():
  app.run(main)


if __name__ == "__main__":
  run()
