"""Exact resume across a real SIGKILL, clean stop on SIGTERM, and restore onto another mesh."""

import json
import os
import signal
import subprocess
import time

import numpy as np
import orbax.checkpoint as ocp

from tinystories_jax.training import config as config_lib
from tinystories_jax.training import loop
from train_helpers import cli_env, tiny_config, tiny_overrides, train_cmd

STEPS = 40  # 2N


def _overrides(data, **extra):
  flags = {"train.steps": STEPS, "train.checkpoint_every": 4, "train.log_every": 1,
           "train.eval_every": 0, "train.keep_checkpoints": 2}
  flags.update(extra)
  return tiny_overrides(data, **flags)


def _logged_step(workdir) -> int:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    lines = [line for line in f.read().splitlines() if line.strip()]
  try:
    return json.loads(lines[-1])["step"] if lines else 0
  except json.JSONDecodeError:  # a line being written
    return 0


def _run_until(workdir, overrides, *, step, sig, timeout=600):
  """Starts training, sends `sig` once `step` is logged; returns (returncode, stderr)."""
  proc = subprocess.Popen(train_cmd(workdir, overrides), env=cli_env(),
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + timeout
  try:
    while _logged_step(workdir) < step and proc.poll() is None and time.time() < deadline:
      time.sleep(0.01)
    if proc.poll() is None:
      proc.send_signal(sig)
    _, err = proc.communicate(timeout=timeout)
  finally:
    if proc.poll() is None:
      proc.kill()
  return proc.returncode, err


def _final_params(workdir):
  path = os.path.join(workdir, "checkpoints", str(STEPS), "params")
  return ocp.StandardCheckpointer().restore(os.path.abspath(path))


def test_kill_and_resume_is_bitwise_exact(tiny_data, tmp_path):
  straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
  subprocess.run(train_cmd(straight, _overrides(tiny_data)), env=cli_env(), check=True,
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=900)
  code, _ = _run_until(killed, _overrides(tiny_data), step=STEPS // 2, sig=signal.SIGKILL)
  assert code == -signal.SIGKILL, "the run finished before it could be killed"
  logged = _logged_step(killed)
  assert STEPS // 2 <= logged < STEPS
  subprocess.run(train_cmd(killed, _overrides(tiny_data)), env=cli_env(), check=True,
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=900)
  a, b = _final_params(straight), _final_params(killed)
  flat_a, flat_b = dict(_flatten(a)), dict(_flatten(b))
  assert flat_a.keys() == flat_b.keys() and len(flat_a) > 10
  for k in flat_a:
    np.testing.assert_array_equal(np.asarray(flat_a[k]), np.asarray(flat_b[k]), err_msg=k)
  # The resumed run picked up where the last finished checkpoint left off (not from 0).
  steps = [json.loads(l)["step"] for l in open(os.path.join(killed, "metrics.jsonl"))]
  assert steps.count(1) == 1


def _flatten(tree, prefix=""):
  if isinstance(tree, dict):
    for k, v in tree.items():
      yield from _flatten(v, f"{prefix}/{k}")
  else:
    yield prefix, tree


def test_sigterm_saves_and_resumes_on_another_mesh(tiny_data, tmp_path):
  workdir = str(tmp_path / "preempted")
  code, err = _run_until(workdir, _overrides(tiny_data, **{"train.checkpoint_every": 1000}),
                         step=8, sig=signal.SIGTERM)
  assert code == 0, err[-2000:]
  assert "SIGTERM received" in err
  steps = [int(s) for s in os.listdir(os.path.join(workdir, "checkpoints"))]
  assert len(steps) == 1 and 8 <= steps[0] < STEPS
  # The subprocess ran on one device; this process has eight: restore onto a (2, 2, 2) mesh.
  run = config_lib.run_config(tiny_config(tiny_data, **{
      "train.steps": STEPS, "train.checkpoint_every": 1000, "train.log_every": 1,
      "train.eval_every": 0, "mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}))
  loop.train(run, workdir)
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  assert rows[-1]["step"] == STEPS
  resumed = [r["step"] for r in rows if r["step"] > steps[0]]
  assert resumed[0] == steps[0] + 1
  assert abs(rows[-1]["train_loss"] - rows[steps[0] - 1]["train_loss"]) < 1.0
