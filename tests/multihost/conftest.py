"""Helpers for the multi-process tests: a tiny corpus, free loopback ports, process groups.

Every process is a real `python -m tinystories_jax.train` with its own fake CPU devices, joined
to the others through `jax.distributed` on 127.0.0.1 (CPU collectives over gloo).
"""

import contextlib
import fcntl
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
# The train step compiles once per device layout; reruns (resumes, the failure test) load it.
# pytest-xdist workers of one run share the directory (and so the compilations).
CACHE_DIR = os.path.join(tempfile.gettempdir(), "tinystories-multihost-xla-cache-" +
                         os.environ.get("PYTEST_XDIST_TESTRUNUID", str(os.getpid())))
# Generous: on two shared cores, four processes compile at once. A process that hangs ends here.
PROCESS_TIMEOUT_S = 420


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def tiny_overrides(data_dir, **extra) -> list[str]:
  """A seconds-long run of the quickstart config: 8 rows of 32 tokens, loss logged every 3 steps.

  A constant learning rate keeps the compiled step the same whatever `train.steps` is, so runs
  of different lengths share the compilation cache.
  """
  flags = {
      "data.dir": str(data_dir), "train.steps": 3, "train.batch_size": 8, "train.seq_len": 32,
      "train.log_every": 3, "train.eval_every": 0, "train.eval_batches": 1,
      "train.checkpoint_every": 3, "train.progress_bar": False,
      "optimizer.schedule": "constant", "optimizer.warmup_steps": 0, "optimizer.lr": 1e-2,
  }
  flags.update(extra)
  return [f"--config.{k}={v}" for k, v in flags.items()]


# The two-process runs shard every parameter over both processes (FSDP over all 4 devices), so
# each process holds, writes and restores its own half of the checkpoint. The four-process run
# keeps the default layout, a `data` axis across all processes.
ACROSS_PROCESSES = {"mesh.data": 1, "mesh.fsdp": 4}


def env() -> dict:
  out = dict(os.environ)
  out.update(JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(REPO),
             JAX_COMPILATION_CACHE_DIR=CACHE_DIR, PYTHONUNBUFFERED="1")
  for name in ("XLA_FLAGS", "JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS",
               "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES"):
    out.pop(name, None)
  return out


class Group:
  """`n` train processes of one job, started together; output goes to files (no pipe stalls)."""

  def __init__(self, workdir, n: int, devices_per_process: int, overrides: list[str], *,
               extra_flags: tuple[str, ...] = (), logdir=None):
    self.n = n
    self.logdir = pathlib.Path(logdir or workdir).with_name(pathlib.Path(workdir).name + "-logs")
    self.logdir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "tinystories_jax.train",
           f"--config={REPO / 'configs/quickstart.py'}", f"--workdir={workdir}", *overrides,
           f"--config.mesh.cpu_devices={devices_per_process}", *extra_flags]
    if n > 1:
      cmd += [f"--coordinator_address=127.0.0.1:{free_port()}", f"--num_processes={n}",
              "--distributed_init_timeout=240"]
    self.procs = []
    for i in range(n):
      out = open(self.logdir / f"process{i}.log", "wb")
      rank = [f"--process_id={i}"] if n > 1 else []
      self.procs.append(subprocess.Popen(cmd + rank, cwd=REPO, env=env(), stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True))
      out.close()

  def log(self, i: int) -> str:
    return (self.logdir / f"process{i}.log").read_text(errors="replace")

  def wait(self, timeout_s: float = PROCESS_TIMEOUT_S) -> list[int]:
    """Return codes of all processes; kills the group and fails if any outlives `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    codes = []
    for i, p in enumerate(self.procs):
      try:
        codes.append(p.wait(timeout=max(1.0, deadline - time.monotonic())))
      except subprocess.TimeoutExpired:
        self.kill()
        pytest.fail(f"process {i} of {self.n} still ran after {timeout_s} s:\n"
                    f"{self.log(i)[-3000:]}")
    return codes

  def check(self, timeout_s: float = PROCESS_TIMEOUT_S) -> None:
    codes = self.wait(timeout_s)
    for i, code in enumerate(codes):
      assert code == 0, f"process {i} of {self.n} exited {code}:\n{self.log(i)[-4000:]}"

  def kill(self) -> None:
    for p in self.procs:
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()


def metrics(workdir) -> list[dict]:
  path = pathlib.Path(workdir) / "metrics.jsonl"
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def loss_at(workdir, step: int) -> float:
  rows = [r for r in metrics(workdir) if r["step"] == step]
  assert len(rows) == 1, f"expected one metrics row for step {step}, got {rows}"
  return rows[0]["train_loss"]


@contextlib.contextmanager
def shared_dir(tmp_path_factory, name: str):
  """A directory built once per test run, even when several pytest-xdist workers ask for it.

  Yields `(path, build)`: when `build` is True the caller fills `path`, under a lock the other
  workers wait on; afterwards they reuse it.
  """
  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    root = root.parent  # shared by all workers of this run
  path = root / name
  with open(root / f"{name}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      done = root / f"{name}.done"
      yield path, not done.exists()
      done.touch()
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def mh_data(tmp_path_factory) -> pathlib.Path:
  """A prepared synthetic corpus: vocab 512, 600 stories (a second or two to make)."""
  with shared_dir(tmp_path_factory, "multihost-data") as (out, build):
    if build:
      subprocess.run([sys.executable, "-m", "tinystories_jax.prepare", "--input=synthetic",
                      "--synthetic_stories=600", "--vocab_size=512", f"--output_dir={out}"],
                     cwd=REPO, env=env(), check=True, capture_output=True, timeout=300)
  return out


@pytest.fixture(scope="session")
def two_processes(mh_data, tmp_path_factory) -> pathlib.Path:
  """Two processes with 2 CPU devices each, parameters sharded over both, 3 steps (a checkpoint
  at 3), started the way a user
  would: `launch/multinode.sh --hosts=localhost,localhost --yes` with explicit coordinator flags.

  Logs are in `<workdir>-logs/process<rank>.log`.
  """
  with shared_dir(tmp_path_factory, "multihost-two") as (workdir, build):
    if build:
      logs = workdir.with_name(workdir.name + "-logs")
      cmd = ["bash", str(REPO / "launch" / "multinode.sh"), "--hosts=localhost,localhost",
             f"--port={free_port()}", f"--logdir={logs}", f"--python={sys.executable}", "--yes",
             "--", f"--config={REPO / 'configs/quickstart.py'}", f"--workdir={workdir}",
             "--config.mesh.cpu_devices=2", "--distributed_init_timeout=240",
             *tiny_overrides(mh_data, **ACROSS_PROCESSES)]
      out = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True,
                           timeout=PROCESS_TIMEOUT_S)
      if out.returncode:
        tails = "\n".join(p.read_text(errors="replace")[-3000:] for p in sorted(logs.glob("*")))
        pytest.fail(f"multinode.sh exited {out.returncode}:\n{out.stdout}{out.stderr}{tails}")
  return workdir
