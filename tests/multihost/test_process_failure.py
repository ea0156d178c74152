"""A job whose process dies ends the survivors with an error within a bounded time, not a hang."""

import os
import signal
import subprocess
import sys
import time

from .conftest import ACROSS_PROCESSES, REPO, Group, env, metrics, tiny_overrides

HEARTBEAT_S = 5
# Heartbeat timeout plus slack for two loaded cores; a hang would outlast it by far.
SURVIVOR_DEADLINE_S = 150


def test_dead_process_ends_the_others(mh_data, two_processes, tmp_path):
  # `two_processes` first: its run leaves this layout's compiled step in the cache, so both
  # processes load it and reach the first collective together (XLA's CPU collectives give them
  # 30 s to meet there, which two compilations on loaded cores can exceed).
  del two_processes
  workdir = tmp_path / "dies"
  group = Group(workdir, 2, 2,
                tiny_overrides(mh_data, **{"train.steps": 100000, "train.log_every": 1,
                                           "train.checkpoint_every": 100000},
                               **ACROSS_PROCESSES),
                extra_flags=(f"--heartbeat_timeout={HEARTBEAT_S}",))
  try:
    # Wait until the job trains (process 0 has logged a step), then kill process 1 outright.
    deadline = time.monotonic() + 400
    while not ((workdir / "metrics.jsonl").exists() and metrics(workdir)):
      assert time.monotonic() < deadline, f"no step was logged:\n{group.log(0)[-3000:]}"
      assert group.procs[0].poll() is None, f"process 0 ended early:\n{group.log(0)[-3000:]}"
      time.sleep(0.5)
    os.killpg(group.procs[1].pid, signal.SIGKILL)
    group.procs[1].wait()
    try:
      code = group.procs[0].wait(timeout=SURVIVOR_DEADLINE_S)
    except subprocess.TimeoutExpired:
      raise AssertionError(f"process 0 still ran {SURVIVOR_DEADLINE_S} s after process 1 died:\n"
                           f"{group.log(0)[-3000:]}") from None
  finally:
    group.kill()
  log = group.log(0)
  assert code not in (0, -signal.SIGKILL), f"process 0 exited {code}:\n{log[-3000:]}"
  # The line that tells the user why the job stopped on its own.
  assert f"stop if one is silent for {HEARTBEAT_S} s" in log


def test_incomplete_flags_fail_in_one_line(mh_data, tmp_path):
  cmd = [sys.executable, "-m", "tinystories_jax.train",
         f"--config={REPO / 'configs/quickstart.py'}", f"--workdir={tmp_path / 'w'}",
         f"--config.data.dir={mh_data}", "--num_processes=2"]
  out = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
  assert out.returncode == 1
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith("error: --coordinator_address and --process_id missing: pass "), last
  assert not (tmp_path / "w").exists()


def test_forced_distributed_without_a_cluster_fails_in_one_line(mh_data, tmp_path):
  cmd = [sys.executable, "-m", "tinystories_jax.train",
         f"--config={REPO / 'configs/quickstart.py'}", f"--workdir={tmp_path / 'w'}",
         f"--config.data.dir={mh_data}", "--config.mesh.distributed=True"]
  out = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
  assert out.returncode == 1, out.stderr[-2000:]
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith("error: mesh.distributed=True but JAX found no cluster to join"), last
