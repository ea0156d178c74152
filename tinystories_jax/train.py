"""Train a TinyStories model: `python -m tinystories_jax.train --config=FILE --workdir=DIR`.

  python -m tinystories_jax.train --config=configs/quickstart.py --workdir=runs/quickstart
  python -m tinystories_jax.train --config=configs/tinystories.py:33m --workdir=runs/33m \\
      --config.data.dir=runs/tinystories-data --config.train.steps=20000

An existing workdir resumes from its latest checkpoint. Any config key can be overridden with
`--config.<section>.<key>=value`; see configs/base.py for all of them.
"""

import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run configuration file (configs/*.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for config.json, metrics and "
                               "checkpoints; an existing one resumes.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  # Imported here so that flag errors are reported without waiting for JAX to load.
  from tinystories_jax.data.errors import DataError  # pylint: disable=g-import-not-at-top
  from tinystories_jax.training import config as config_lib  # pylint: disable=g-import-not-at-top
  from tinystories_jax.training import loop  # pylint: disable=g-import-not-at-top
  try:
    run = config_lib.run_config(_CONFIG.value)
    loop.setup_runtime(run)
    loop.train(run, _WORKDIR.value)
  except (config_lib.ConfigError, DataError, loop.TrainingDiverged) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


def run():
  app.run(main)


if __name__ == "__main__":
  run()
