"""Write stories with a trained model: `python -m tinystories_jax.sample --workdir=DIR ...`.

  python -m tinystories_jax.sample --workdir=runs/quickstart --prompt="Once upon a time"
  python -m tinystories_jax.sample --workdir=runs/quickstart --prompt="Tom had a dog" \\
      --num_samples=3
  python -m tinystories_jax.sample --workdir=runs/33m --prompts_file=prompts.jsonl \\
      --output=completions.jsonl --num_beams=5 --temperature=0

A single --prompt streams its story to the terminal; --prompts_file (JSONL with id and prompt, or
one prompt a line) writes JSONL rows {"id", "prompt", "completion", "model", "sampler"} to
--output, the file `grade` reads (or to stdout without --output). Unset sampler flags take
`SamplerConfig`'s defaults. See docs/sampling.md.
"""

import sys

from absl import app, flags, logging

_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir of a training run or `interop import-*`.")
_PROMPT = flags.DEFINE_string("prompt", None, "A story beginning to continue.")
_PROMPTS_FILE = flags.DEFINE_string("prompts_file", None, "JSONL with id and prompt per line, or "
                                    "one plain-text prompt a line.")
_OUTPUT = flags.DEFINE_string("output", None, "Completions JSONL to append to (a rerun skips "
                              "rows already there); without it --prompts_file rows go to stdout.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 1, "Stories per prompt.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Stories decoded together.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_DTYPE = flags.DEFINE_enum("dtype", "auto", ["auto", "float32", "bfloat16", "float16"],
                           "Compute dtype; auto: float32 on CPU, the trained dtype elsewhere.")
# Sampler settings: None means SamplerConfig's default (the one place defaults live).
_TEMPERATURE = flags.DEFINE_float("temperature", None, "0 is greedy (default 0.8).")
_TOP_K = flags.DEFINE_integer("top_k", None, "Sample among the k likeliest tokens; 0: no limit.")
_TOP_P = flags.DEFINE_float("top_p", None, "Nucleus sampling mass (default 0.95; 1: off).")
_NUM_BEAMS = flags.DEFINE_integer("num_beams", None, "Beam search with this many beams (> 1).")
_LENGTH_PENALTY = flags.DEFINE_float("length_penalty", None, "Beam score divisor exponent "
                                     "(default 1.0).")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", None, "Most new tokens per story (default: "
                                "512, or what the model's context leaves).")
_MIN_NEW = flags.DEFINE_integer("min_new_tokens", None, "No end of story before this many.")
_STOP = flags.DEFINE_multi_string("stop", None, "A string that ends a story (repeatable).")
_SEED = flags.DEFINE_integer("seed", None, "Same seed, same stories (default 0).")
_MATMUL_DTYPE = flags.DEFINE_enum(
    "matmul_dtype", None, ["bfloat16"], "Decode matmuls on bfloat16 weights and inputs with "
    "float32 accumulation, the rest in --dtype: faster on a CPU, the weights rounded "
    "(docs/sampling.md). Default: --dtype throughout.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  if not _WORKDIR.value:
    print("error: pass --workdir=DIR, the workdir of a training run or of `interop import-*`.",
          file=sys.stderr)
    sys.exit(2)
  logging.set_verbosity(logging.WARNING)  # checkpoint-library chatter would bury the story
  # Imported here so that flag errors are reported without waiting for JAX to load.
  from tinystories_jax.sampling import command  # pylint: disable=g-import-not-at-top
  req = command.SampleRequest(
      workdir=_WORKDIR.value, prompt=_PROMPT.value, prompts_file=_PROMPTS_FILE.value,
      output=_OUTPUT.value, num_samples=_NUM_SAMPLES.value, batch_size=_BATCH_SIZE.value,
      step=_STEP.value, dtype=_DTYPE.value, matmul_dtype=_MATMUL_DTYPE.value,
      sampler=dict(temperature=_TEMPERATURE.value, top_k=_TOP_K.value, top_p=_TOP_P.value,
                   num_beams=_NUM_BEAMS.value, length_penalty=_LENGTH_PENALTY.value,
                   max_new_tokens=_MAX_NEW.value, min_new_tokens=_MIN_NEW.value,
                   stop=tuple(_STOP.value) if _STOP.value else None, seed=_SEED.value))
  try:
    command.run_sample(req)
  except command.SamplerError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  except KeyboardInterrupt:
    print("\ninterrupted; rows already written to --output are kept.", file=sys.stderr)
    sys.exit(130)


def run():
  app.run(main)


if __name__ == "__main__":
  run()
