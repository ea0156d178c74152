r"""Import and export checkpoints.

    python -m tinystories_jax.interop import-hf --hf_dir=DIR --workdir=DIR
    python -m tinystories_jax.interop export-hf --workdir=DIR --output_dir=DIR
    python -m tinystories_jax.interop export-llama2c --workdir=DIR --output=FILE

(also installed as `tinystories-interop`). docs/models.md describes every flag.
"""

from __future__ import annotations

import sys

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("hf_dir", None, "import-hf: a transformers GPTNeoForCausalLM or "
                    "LlamaForCausalLM directory (config.json + model.safetensors or "
                    "pytorch_model.bin).")
flags.DEFINE_string("workdir", None, "The workdir to write (import-hf; must hold no checkpoints) "
                    "or to read (export-*).")
flags.DEFINE_string("output_dir", None, "export-hf: directory to write the HF model into.")
flags.DEFINE_string("output", None, "export-llama2c: the .bin checkpoint file to write.")
flags.DEFINE_string("tokenizer_output", None, "export-llama2c: where to write llama2.c's "
                    "tokenizer.bin (default: tokenizer.bin beside --output).")
flags.DEFINE_integer("step", None, "export-*: checkpoint step to read (default: the latest).")
flags.DEFINE_string("attention_impl", "auto", "import-hf: attention implementation recorded in "
                    "the imported model config.")
flags.DEFINE_string("dtype", "float32", "import-hf: compute dtype recorded in the imported "
                    "model config (float32 or bfloat16).")

COMMANDS = ("import-hf", "export-hf", "export-llama2c")
_NEEDS = {"import-hf": ("hf_dir", "workdir"), "export-hf": ("workdir", "output_dir"),
          "export-llama2c": ("workdir", "output")}


def main(argv):
  if len(argv) != 2 or argv[1] not in COMMANDS:
    raise app.UsageError(f"Name one command: {', '.join(COMMANDS)}.")
  command = argv[1]
  missing = [f"--{name}" for name in _NEEDS[command] if not getattr(FLAGS, name)]
  if missing:
    raise app.UsageError(f"{command} needs {' and '.join(missing)}.")
  from tinystories_jax.interop import hf, llama2c  # noqa: PLC0415 (flags parse fast)

  try:
    if command == "import-hf":
      out = hf.import_hf(FLAGS.hf_dir, FLAGS.workdir, attention_impl=FLAGS.attention_impl,
                         dtype=FLAGS.dtype)
      from tinystories_jax.interop import workdir as wd  # noqa: PLC0415

      note = wd.read_config(out)["data"]["tokenizer"].get("note")
      print(f"Imported {FLAGS.hf_dir} into {out}.")
      if note:
        print(f"Tokenizer: {note}")
    elif command == "export-hf":
      out = hf.export_hf(FLAGS.workdir, FLAGS.output_dir, step=FLAGS.step)
      print(f"Wrote a transformers model to {out}.")
    else:
      out = llama2c.export_llama2c(FLAGS.workdir, FLAGS.output, step=FLAGS.step,
                                   tokenizer_output=FLAGS.tokenizer_output)
      print(f"Wrote llama2.c checkpoint {out}.")
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


def run():
  app.run(main)


if __name__ == "__main__":
  run()
