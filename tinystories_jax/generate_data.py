r"""Generates a TinyStories-style corpus with an LLM, as the paper made TinyStories.

  OPENAI_API_KEY=... python -m tinystories_jax.generate_data --num_stories=1000 \
      --output=data/generated/stories.jsonl --model=gpt-4o-mini --seed=0 [--instruct]

Writes the JSONL (appended as stories arrive; rerunning resumes), the `.txt` layout with
`<|endoftext|>` lines, rejected answers with reasons, and stats beside --output. With
--mode=batch the requests go through the OpenAI Batch API instead. See docs/datagen.md.
"""

import sys

from absl import app
from absl import flags

from tinystories_jax.datagen import generator
from tinystories_jax.datagen import prompts
from tinystories_jax.datagen import quality
from tinystories_jax.datagen import vocabulary
from tinystories_jax.grading import batch
from tinystories_jax.grading import client as client_lib
from tinystories_jax.grading import pricing

_NUM_STORIES = flags.DEFINE_integer("num_stories", None, "Stories to keep.")
_OUTPUT = flags.DEFINE_string("output", None, "Output JSONL file (the .txt layout goes beside it).")
_MODEL = flags.DEFINE_string("model", "gpt-4o-mini", "Storytelling model.")
_BASE_URL = flags.DEFINE_string(
    "base_url", None, "OpenAI-compatible base URL, e.g. http://localhost:8000/v1; default OpenAI.")
_API_KEY_ENV = flags.DEFINE_string(
    "api_key_env", "OPENAI_API_KEY", "Environment variable that holds the API key.")
_CONCURRENCY = flags.DEFINE_integer("concurrency", 16, "Most requests in flight at once.")
_MAX_RETRIES = flags.DEFINE_integer("max_retries", 6, "Retries per request after the first try.")
_TIMEOUT = flags.DEFINE_float("timeout", 120.0, "Seconds before a request times out.")
_BACKOFF = flags.DEFINE_float("backoff", 1.0, "First retry backoff in seconds; doubles per retry.")
_SEED = flags.DEFINE_integer("seed", 0, "Fixes every prompt: the same seed gives the same prompts.")
_INSTRUCT = flags.DEFINE_bool(
    "instruct", False, "Also ask for a summary and write the TinyStoriesInstruct layout.")
_WORDS = flags.DEFINE_string(
    "words", None, "Vocabulary file with [nouns] [verbs] [adjectives] sections; default packaged.")
_FEATURES = flags.DEFINE_string(
    "features", "", f"Story features to draw from, comma separated (default all: "
    f"{','.join(prompts.FEATURES)}).")
_FEATURE_PROBABILITY = flags.DEFINE_float(
    "feature_probability", 0.35, "Chance that a prompt asks for each feature.")
_MIN_WORDS = flags.DEFINE_integer("min_words", 60, "Reject stories shorter than this.")
_MAX_WORDS = flags.DEFINE_integer("max_words", 600, "Reject stories longer than this.")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "Sampling temperature for stories.")
_MAX_TOKENS = flags.DEFINE_integer(
    "max_tokens", 1000, "Answer cap for each story request; lower it for a local server with a "
    "short context (a 600-word story is about 800 tokens).")
_PRICES = flags.DEFINE_string(
    "prices", "", "Extra prices MODEL=IN:OUT (USD per million tokens), comma separated.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar.")
_MODE = flags.DEFINE_enum(
    "mode", "online", ["online", "batch"],
    "online: interactive requests; batch: the OpenAI Batch API (half price, within 24 h).")
_BATCH_POLL = flags.DEFINE_float("batch_poll_interval", 30.0, "Seconds between batch checks.")
_BATCH_MAX_REQUESTS = flags.DEFINE_integer(
    "batch_max_requests", 50_000, "Requests per batch (the API allows 50,000).")
_BATCH_MAX_ROUNDS = flags.DEFINE_integer(
    "batch_max_rounds", 3, "Submissions per request before it counts as failed.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  for flag, what in ((_NUM_STORIES, "--num_stories=N"), (_OUTPUT, "--output=FILE.jsonl")):
    if flag.value is None:
      print(f"Missing {what.split('=')[0]}: pass {what}.", file=sys.stderr)
      sys.exit(2)
  client_lib.quiet_http_logs()
  try:
    config = generator.GenerateConfig(
        num_stories=_NUM_STORIES.value, output=_OUTPUT.value,
        client=client_lib.ClientConfig(
            model=_MODEL.value, base_url=_BASE_URL.value, api_key_env=_API_KEY_ENV.value,
            concurrency=_CONCURRENCY.value, max_retries=_MAX_RETRIES.value,
            timeout_s=_TIMEOUT.value, backoff_initial_s=_BACKOFF.value),
        seed=_SEED.value, instruct=_INSTRUCT.value, words=_WORDS.value,
        features=prompts.parse_features(_FEATURES.value),
        feature_probability=_FEATURE_PROBABILITY.value,
        limits=quality.Limits(_MIN_WORDS.value, _MAX_WORDS.value),
        max_tokens=_MAX_TOKENS.value, temperature=_TEMPERATURE.value,
        prices=pricing.parse_prices(_PRICES.value),
        progress=_PROGRESS.value, mode=_MODE.value,
        batch=batch.BatchConfig(max_requests=_BATCH_MAX_REQUESTS.value,
                                max_rounds=_BATCH_MAX_ROUNDS.value,
                                poll_interval_s=_BATCH_POLL.value))
    stats = generator.generate(config)
  except (generator.GenerationError, vocabulary.VocabularyError, client_lib.ConfigError,
          client_lib.StopRun, ValueError, RuntimeError) as e:
    print(str(e), file=sys.stderr)
    sys.exit(1)
  except OSError as e:  # e.g. --output under an existing file, or in a read-only place
    print(f"{e.filename or _OUTPUT.value}: {e.strerror or e}; --output must be a .jsonl path "
          "this user can write.", file=sys.stderr)
    sys.exit(1)
  print(generator.describe(stats))


def run():
  app.run(main)


if __name__ == "__main__":
  run()
