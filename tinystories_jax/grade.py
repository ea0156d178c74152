r"""Grades story completions with an LLM acting as a teacher (the TinyStories paper's evaluation).

  OPENAI_API_KEY=... python -m tinystories_jax.grade \
      --completions=runs/33m/completions.jsonl,runs/8m/completions.jsonl \
      --output_dir=runs/eval --model=gpt-4o

Against a local OpenAI-compatible server: add --base_url=http://localhost:8000/v1 (no key needed).
Writes grades.jsonl (every answer, appended as it arrives; rerunning resumes), summary.json,
report.md and charts into --output_dir. See docs/grading.md.
"""

import sys

from absl import app
from absl import flags

from tinystories_jax.grading import batch
from tinystories_jax.grading import client as client_lib
from tinystories_jax.grading import completions
from tinystories_jax.grading import grader
from tinystories_jax.grading import pricing
from tinystories_jax.grading import rubric

_COMPLETIONS = flags.DEFINE_list("completions", [], "Completions JSONL files to grade.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Directory for grades and the report.")
_MODEL = flags.DEFINE_string("model", "gpt-4o", "Grader model.")
_BASE_URL = flags.DEFINE_string(
    "base_url", None, "OpenAI-compatible base URL, e.g. http://localhost:8000/v1; default OpenAI.")
_API_KEY_ENV = flags.DEFINE_string(
    "api_key_env", "OPENAI_API_KEY", "Environment variable that holds the API key.")
_CONCURRENCY = flags.DEFINE_integer("concurrency", 16, "Most requests in flight at once.")
_MAX_RETRIES = flags.DEFINE_integer("max_retries", 6, "Retries per request after the first try.")
_TIMEOUT = flags.DEFINE_float("timeout", 120.0, "Seconds before a request times out.")
_BACKOFF = flags.DEFINE_float("backoff", 1.0, "First retry backoff in seconds; doubles per retry.")
_MAX_AUTH_FAILURES = flags.DEFINE_integer(
    "max_auth_failures", 3, "Consecutive 401/403 answers after which the run stops.")
_RUBRIC = flags.DEFINE_enum("rubric", "story", list(rubric.RUBRICS), "Grading rubric.")
_STRUCTURED = flags.DEFINE_bool(
    "structured_output", True, "Ask for JSON-schema answers where the endpoint supports them.")
_REFERENCE = flags.DEFINE_list(
    "reference_stories", [], "Dataset story files (.jsonl/.txt) to cut and grade as a ceiling.")
_REFERENCE_COUNT = flags.DEFINE_integer("reference_count", 100, "How many reference stories.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed for picking reference stories and retry jitter.")
_RETRY_FAILED = flags.DEFINE_bool("retry_failed", False, "Grade again items that failed before.")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 500, "Answer cap per grader turn.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "Grader temperature.")
_PRICES = flags.DEFINE_string(
    "prices", "", "Extra prices MODEL=IN:OUT (USD per million tokens), comma separated.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar.")
_MODE = flags.DEFINE_enum(
    "mode", "online", ["online", "batch"],
    "online: interactive requests; batch: the OpenAI Batch API (half price, within 24 h).")
_WORKERS = flags.DEFINE_integer(
    "workers", 1, "Processes for online grading; more than 1 only helps when one process's "
    "CPU is the limit (a fast local endpoint). --concurrency is shared among them.")
_BATCH_POLL = flags.DEFINE_float("batch_poll_interval", 30.0, "Seconds between batch checks.")
_BATCH_MAX_REQUESTS = flags.DEFINE_integer(
    "batch_max_requests", 50_000, "Requests per batch (the API allows 50,000).")
_BATCH_MAX_ROUNDS = flags.DEFINE_integer(
    "batch_max_rounds", 3, "Submissions per request before it counts as failed.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  if not _OUTPUT_DIR.value:
    print("Missing --output_dir: pass the directory for grades and the report.", file=sys.stderr)
    sys.exit(2)
  client_lib.quiet_http_logs()
  try:
    config = grader.GradeConfig(
        completions=tuple(_COMPLETIONS.value), output_dir=_OUTPUT_DIR.value,
        client=client_lib.ClientConfig(
            model=_MODEL.value, base_url=_BASE_URL.value, api_key_env=_API_KEY_ENV.value,
            concurrency=_CONCURRENCY.value, max_retries=_MAX_RETRIES.value,
            timeout_s=_TIMEOUT.value, backoff_initial_s=_BACKOFF.value,
            max_auth_failures=_MAX_AUTH_FAILURES.value),
        rubric=_RUBRIC.value, structured_output=_STRUCTURED.value,
        reference_stories=tuple(_REFERENCE.value), reference_count=_REFERENCE_COUNT.value,
        seed=_SEED.value, retry_failed=_RETRY_FAILED.value, max_tokens=_MAX_TOKENS.value,
        temperature=_TEMPERATURE.value, prices=pricing.parse_prices(_PRICES.value),
        progress=_PROGRESS.value, mode=_MODE.value, workers=_WORKERS.value,
        batch=batch.BatchConfig(max_requests=_BATCH_MAX_REQUESTS.value,
                                max_rounds=_BATCH_MAX_ROUNDS.value,
                                poll_interval_s=_BATCH_POLL.value))
    summary = grader.grade(config)
  except (completions.InputError, client_lib.ConfigError, client_lib.StopRun, ValueError,
          RuntimeError) as e:
    print(str(e), file=sys.stderr)
    sys.exit(1)
  except OSError as e:  # e.g. --output_dir names an existing file, or a read-only place
    print(f"{e.filename or _OUTPUT_DIR.value}: {e.strerror or e}; --output_dir must be a "
          "directory this user can write.", file=sys.stderr)
    sys.exit(1)
  print(f"{summary['graded']} graded, {summary['failed']} failed; report in "
        f"{_OUTPUT_DIR.value}/report.md")


def run():
  app.run(main)


if __name__ == "__main__":
  run()
