"""Serve a model over OpenAI's API: `python -m tinystories_jax.serve --workdir=DIR`.

  python -m tinystories_jax.serve --workdir=runs/quickstart --port=8000
  curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
      -d '{"model": "quickstart", "prompt": "Once upon a time", "max_tokens": 200}'

Any OpenAI client works with base_url=http://127.0.0.1:8000/v1 (no key is checked). Binds loopback
unless --host says otherwise; SIGTERM finishes or fails in-flight requests, then exits. See
docs/sampling.md.
"""

import sys

from absl import app, flags, logging

_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir of a training run or `interop import-*`.")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to bind (loopback by default).")
_PORT = flags.DEFINE_integer("port", 8000, "Port to bind; 0 picks a free one.")
_MODEL_NAME = flags.DEFINE_string("model_name", None, "Model id clients pass (default: the "
                                  "workdir's directory name).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_DTYPE = flags.DEFINE_enum("dtype", "auto", ["auto", "float32", "bfloat16", "float16"],
                           "Compute dtype; auto: float32 on CPU, the trained dtype elsewhere.")
_MATMUL_DTYPE = flags.DEFINE_enum(
    "matmul_dtype", None, ["bfloat16"], "Decode matmuls on bfloat16 weights and inputs with "
    "float32 accumulation, the rest in --dtype: faster on a CPU, the weights rounded "
    "(docs/sampling.md). Default: --dtype throughout.")
_MAX_BATCH = flags.DEFINE_integer("max_batch", 32, "Most stories decoded together.")
_MAX_QUEUE = flags.DEFINE_integer("max_queue", 64, "Most requests waiting; more get 429.")
_GRACE = flags.DEFINE_float("grace_s", 30.0, "Seconds in-flight requests get after SIGTERM.")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens_cap", 512, "Largest max_tokens a request may ask.")
_MAX_PROMPT = flags.DEFINE_integer("max_prompt_tokens", 1024, "Longest prompt accepted, in "
                                   "tokens (the model's context also bounds it).")
_MAX_N = flags.DEFINE_integer("max_n", 16, "Largest n (choices per prompt).")
_MAX_BODY = flags.DEFINE_integer("max_body_bytes", 1 << 20, "Largest request body.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  if not _WORKDIR.value:
    print("error: pass --workdir=DIR, the workdir of a training run or of `interop import-*`.",
          file=sys.stderr)
    sys.exit(2)
  logging.set_verbosity(logging.WARNING)
  # Imported here so that flag errors are reported without waiting for JAX to load.
  from tinystories_jax import serving  # pylint: disable=g-import-not-at-top
  from tinystories_jax.sampling import SamplerError  # pylint: disable=g-import-not-at-top
  limits = serving.Limits(max_body_bytes=_MAX_BODY.value, max_prompt_tokens=_MAX_PROMPT.value,
                          max_tokens=_MAX_TOKENS.value, max_n=_MAX_N.value)
  opts = serving.ServeOptions(
      workdir=_WORKDIR.value, host=_HOST.value, port=_PORT.value, model_name=_MODEL_NAME.value,
      step=_STEP.value, dtype=_DTYPE.value, matmul_dtype=_MATMUL_DTYPE.value,
      max_batch=_MAX_BATCH.value, max_queue=_MAX_QUEUE.value,
      grace_s=_GRACE.value, limits=limits)
  try:
    serving.serve(opts)
  except SamplerError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


def run():
  app.run(main)


if __name__ == "__main__":
  run()
