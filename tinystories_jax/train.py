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
# Multi-process jobs (docs/multihost.md). SLURM, Open MPI and TPU pods need none of these: JAX
# reads the job's layout from the environment.
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0, which "
                                   "hosts the coordinator (default: $JAX_COORDINATOR_ADDRESS).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's rank, 0 .. "
                                   "num_processes - 1.")
_LOCAL_DEVICES = flags.DEFINE_list("local_device_ids", None, "Accelerator ids this process "
                                   "drives, e.g. 0 for one process per GPU (default: all).")
_INIT_TIMEOUT = flags.DEFINE_integer("distributed_init_timeout", 300, "Seconds processes wait "
                                     "for each other at start-up before giving up.")
_HEARTBEAT = flags.DEFINE_integer("heartbeat_timeout", 100, "Seconds a silent process is "
                                  "tolerated before the others stop with an error.")
flags.mark_flags_as_required(["config", "workdir"])


def _distributed_options():
  from tinystories_jax.parallel import distributed  # pylint: disable=g-import-not-at-top
  local = _LOCAL_DEVICES.value
  if local is not None and not all(x.strip().isdigit() for x in local):
    raise distributed.DistributedError(f"--local_device_ids={','.join(local)} must be "
                                       "comma-separated device numbers, e.g. 0 or 0,1.")
  return distributed.DistributedOptions(
      coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
      process_id=_PROCESS_ID.value,
      local_device_ids=tuple(int(x) for x in local) if local else None,
      init_timeout_s=_INIT_TIMEOUT.value, heartbeat_timeout_s=_HEARTBEAT.value)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  # Imported here so that flag errors are reported without waiting for JAX to load.
  from tinystories_jax.data.errors import DataError  # pylint: disable=g-import-not-at-top
  from tinystories_jax.training import config as config_lib  # pylint: disable=g-import-not-at-top
  from tinystories_jax.training import loop  # pylint: disable=g-import-not-at-top
  from tinystories_jax.parallel import distributed  # pylint: disable=g-import-not-at-top
  try:
    config = _CONFIG.value.to_dict()
  except (OSError, ValueError) as e:  # config_flags defers a file's load errors to first use
    detail = " ".join(str(e).split())
    print(f"error: --config could not be loaded ({detail}); pass a config file such as "
          "configs/quickstart.py or configs/tinystories.py:33m.", file=sys.stderr)
    sys.exit(2)
  try:
    run = config_lib.run_config(config)
    loop.setup_runtime(run, _distributed_options())
    loop.train(run, _WORKDIR.value)
  except (config_lib.ConfigError, DataError, distributed.DistributedError,
          loop.TrainingDiverged) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


def _parse_flags(argv):
  """absl's parser, with config-override mistakes reported in one line instead of a traceback."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    lines = [line for line in str(e).splitlines() if line.strip()]
    if any(line.startswith("Traceback") for line in lines):
      # An exception inside the config file's get_config(): its last line is the message.
      lines = [lines[0].rstrip(":") + ":", lines[-1]]
    print("error: " + " ".join(lines), file=sys.stderr)
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    # ml_collections raises these for an override of a key that does not exist (KeyError /
    # AttributeError, with a did-you-mean hint) or a value of the wrong type.
    detail = " ".join(str(e).replace("\\n", " ").replace("\\'", "").strip("'\"").split())
    overrides = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
    first = detail.split()[0] if detail else ""
    culprit = next((o for o in overrides if o.rsplit(".", 1)[-1] == first), None) or next(
        (o for o in overrides if o.rsplit(".", 1)[-1] in detail), None)
    where = f"{culprit}: " if culprit else ""
    print(f"error: {where}invalid config override ({detail}); the valid keys and their types "
          "are in configs/base.py.", file=sys.stderr)
  sys.exit(2)


def run():
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
