"""Multi-process start-up: when to call `jax.distributed.initialize`, and with what.

A job spans several processes when one of these says so, checked in this order:

1. explicit flags: `--coordinator_address`, `--num_processes`, `--process_id` (all three; the
   address may instead come from `JAX_COORDINATOR_ADDRESS`);
2. SLURM: `SLURM_NTASKS` > 1 inside an `srun` step (JAX reads the node list, the task's rank and
   its local GPU from the `SLURM_*` variables);
3. Open MPI: `OMPI_COMM_WORLD_SIZE` > 1 (`mpirun` of Open MPI 4; with Open MPI 5 pass the flags);
4. TPU on GKE: `TPU_WORKER_HOSTNAMES` with more than one host;
5. `mesh.distributed=True`: initialise anyway and let JAX find the cluster itself. Cloud TPU VM
   pod slices need this: their workers learn the topology from the VM metadata server, which
   is only asked when a run requests it.

Otherwise the run is single-process and nothing is initialised. Errors a user can cause (a missing
flag, a process id out of range, a coordinator nobody answers at, a port already taken) raise
`DistributedError` with one sentence saying what to change, before JAX starts waiting. A process
that dies later is JAX's to notice: the others miss its heartbeats for `heartbeat_timeout_s`
seconds and exit with an error instead of hanging in the next collective.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import time
from typing import Mapping

import jax
from absl import logging


class DistributedError(ValueError):
  """A multi-process setup that cannot work; the message says what to change."""


@dataclasses.dataclass(frozen=True)
class DistributedOptions:
  """How to join a multi-process job; unset fields come from the cluster environment.

  Attributes:
    coordinator_address: `host:port` of process 0's coordinator service.
    num_processes: processes in the job.
    process_id: this process's rank, in [0, num_processes).
    local_device_ids: accelerators this process drives (one process per GPU); None: all visible.
    force: initialise even when no variable or flag says the job is multi-process (TPU VM pods).
    init_timeout_s: how long processes wait for each other at start-up.
    heartbeat_timeout_s: how long a silent process is tolerated before the others give up.
  """
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  local_device_ids: tuple[int, ...] | None = None
  force: bool = False
  init_timeout_s: int = 300
  heartbeat_timeout_s: int = 100


@dataclasses.dataclass(frozen=True)
class Launch:
  """What `plan` decided: `source` names who said the job is multi-process (None: nobody)."""
  source: str | None
  kwargs: Mapping[str, object]


def _int_env(env: Mapping[str, str], name: str) -> int | None:
  value = env.get(name, "").strip()
  return int(value) if value.isdigit() else None


def _check_address(address: str, origin: str) -> None:
  host, sep, port = address.rpartition(":")
  if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise DistributedError(f"{origin}={address!r} is not host:port; pass the address of process "
                           "0's machine and a free port, e.g. 10.0.0.2:8476.")


def plan(opts: DistributedOptions, env: Mapping[str, str] | None = None) -> Launch:
  """Decides whether and how to initialise, from the options and the environment.

  Args:
    opts: the command-line options.
    env: environment variables (default: `os.environ`).

  Returns:
    `Launch(source, kwargs)`: `kwargs` are for `jax.distributed.initialize`; `source` is None
    when the job is single-process.

  Raises:
    DistributedError: the flags are incomplete or inconsistent.
  """
  env = os.environ if env is None else env
  timeouts = {"initialization_timeout": int(opts.init_timeout_s),
              "heartbeat_timeout_seconds": int(opts.heartbeat_timeout_s)}
  if opts.init_timeout_s <= 0 or opts.heartbeat_timeout_s <= 0:
    raise DistributedError("--distributed_init_timeout and --heartbeat_timeout must be positive "
                           "numbers of seconds.")
  local = {"local_device_ids": list(opts.local_device_ids)} if opts.local_device_ids else {}
  explicit = {"--coordinator_address": opts.coordinator_address,
              "--num_processes": opts.num_processes, "--process_id": opts.process_id}
  if any(v is not None for v in explicit.values()):
    address = opts.coordinator_address or env.get("JAX_COORDINATOR_ADDRESS")
    if address:
      explicit["--coordinator_address"] = address
    missing = [k for k, v in explicit.items() if v is None]
    if missing:
      raise DistributedError(f"{' and '.join(missing)} missing: pass --coordinator_address, "
                             "--num_processes and --process_id together (the same address and "
                             "count on every process, a different id on each).")
    _check_address(address, "--coordinator_address")
    n, i = opts.num_processes, opts.process_id
    if n < 1 or not 0 <= i < n:
      raise DistributedError(f"--process_id={i} is outside [0, --num_processes={n}); number the "
                             f"processes 0 to {n - 1}.")
    return Launch("flags", dict(coordinator_address=address, num_processes=n, process_id=i,
                                cluster_detection_method="deactivate", **local, **timeouts))
  slurm_tasks = _int_env(env, "SLURM_STEP_NUM_TASKS") or _int_env(env, "SLURM_NTASKS")
  if slurm_tasks and slurm_tasks > 1 and "SLURM_PROCID" in env:
    if "SLURM_STEP_NODELIST" not in env:
      raise DistributedError(f"SLURM_NTASKS={slurm_tasks} but this is not an srun step; start "
                             "the training command with srun so that every task runs it.")
    local = local or _slurm_local_devices(env, slurm_tasks)
    return Launch("slurm", dict(cluster_detection_method="slurm", **local, **timeouts))
  ompi = _int_env(env, "OMPI_COMM_WORLD_SIZE")
  if ompi and ompi > 1:
    if "OMPI_MCA_orte_hnp_uri" not in env:
      # JAX finds the coordinator through this variable, which Open MPI 5 no longer sets.
      raise DistributedError(f"OMPI_COMM_WORLD_SIZE={ompi} but this mpirun does not say where "
                             "its head node is; pass --coordinator_address=HEAD:PORT "
                             "--num_processes=$OMPI_COMM_WORLD_SIZE "
                             "--process_id=$OMPI_COMM_WORLD_RANK instead.")
    return Launch("ompi", dict(cluster_detection_method="ompi", **local, **timeouts))
  hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
  if len(hosts) > 1:
    return Launch("tpu", dict(**local, **timeouts))
  if opts.force:
    return Launch("auto-detect", dict(**local, **timeouts))
  return Launch(None, {})


def _slurm_local_devices(env: Mapping[str, str], tasks: int) -> dict:
  """The GPUs a SLURM task drives, where JAX's default (GPU number SLURM_LOCALID) is wrong.

  JAX gives each task the one GPU numbered by its rank on the node. That is right for one task
  per GPU, but with one task per node it would leave all GPUs but the first idle, and with
  `--gpus-per-task=1` the task sees a single GPU, which is number 0 whatever its rank.
  """
  nodes = _int_env(env, "SLURM_STEP_NUM_NODES") or _int_env(env, "SLURM_NNODES")
  visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
  if nodes and tasks == nodes:
    gpus = _int_env(env, "SLURM_GPUS_ON_NODE") or len(visible)
    return {"local_device_ids": list(range(gpus))} if gpus else {}
  if len(visible) == 1:
    return {"local_device_ids": [0]}
  return {}


def _wait_for_coordinator(address: str, timeout_s: float) -> None:
  """Returns once something accepts TCP connections at `address`, or raises after `timeout_s`."""
  host, _, port = address.rpartition(":")
  host = host.strip("[]")
  deadline = time.monotonic() + timeout_s
  last = None
  while True:
    try:
      with socket.create_connection((host, int(port)), timeout=min(5.0, timeout_s)):
        return
    except OSError as e:
      last = e
    if time.monotonic() >= deadline:
      break
    time.sleep(0.25)
  raise DistributedError(
      f"No coordinator answered at {address} within {timeout_s:g} s ({last}); start process 0 "
      "with the same --coordinator_address (it hosts the coordinator), check the host and port, "
      "or raise --distributed_init_timeout.")


def _check_port_free(address: str) -> None:
  """Process 0 hosts the coordinator: fail early, in one line, if its port is taken."""
  port = int(address.rpartition(":")[2])
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    # As gRPC does: a port left in TIME_WAIT by a previous run is free; a listening one is not.
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
      s.bind(("", port))
    except OSError as e:
      raise DistributedError(f"Process 0 cannot host the coordinator on port {port} ({e}); pick "
                             "a free port in --coordinator_address on every process.") from e


def initialize(opts: DistributedOptions, env: Mapping[str, str] | None = None) -> bool:
  """Joins the multi-process job when the environment or flags describe one.

  Must run before anything touches JAX's devices. A no-op (returning False) on one process.

  Returns:
    True when `jax.distributed.initialize` was called.

  Raises:
    DistributedError: bad flags, an unreachable coordinator, or a port already in use.
  """
  launch = plan(opts, env)
  if launch.source is None:
    return False
  if jax.distributed.is_initialized():
    return True
  kwargs = dict(launch.kwargs)
  if launch.source == "flags":
    address, rank = kwargs["coordinator_address"], kwargs["process_id"]
    if rank == 0:
      _check_port_free(address)
    else:
      # JAX's own wait ends the process with a fatal log line; this one is a readable error.
      _wait_for_coordinator(address, opts.init_timeout_s)
  # CPU processes exchange data through gloo over TCP; without a CPU collectives backend a
  # multi-process CPU computation fails at its first all-reduce. Keep a user's own choice (mpi).
  if not jax.config.jax_cpu_collectives_implementation:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  where = kwargs.get("coordinator_address", "the address the cluster provides")
  logging.info("Joining a multi-process job (%s) through %s; processes wait up to %d s for each "
               "other, and stop if one is silent for %d s. If a process never joins, JAX's "
               "runtime ends the others with a fatal DEADLINE_EXCEEDED error and a stack dump "
               "(not catchable here): start every process, or raise --distributed_init_timeout.",
               launch.source, where, opts.init_timeout_s, opts.heartbeat_timeout_s)
  try:
    jax.distributed.initialize(**kwargs)
  except (RuntimeError, ValueError, TypeError) as e:
    detail = " ".join(str(e).split())[:300]
    if launch.source == "auto-detect":
      raise DistributedError(f"mesh.distributed=True but JAX found no cluster to join ({detail}); "
                             "on a Cloud TPU VM slice start the run on every worker, elsewhere "
                             "pass --coordinator_address, --num_processes and --process_id, or "
                             "drop mesh.distributed for a one-process run.") from e
    raise DistributedError(f"jax.distributed.initialize failed ({launch.source}: {detail}); "
                           "check that every process got the same coordinator and process "
                           "count.") from e
  if jax.process_index() != 0:
    # Only process 0 reports progress; the others still print warnings and errors.
    logging.set_verbosity(logging.WARNING)
  logging.info("Process %d of %d: %d local of %d global devices.", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  return True
