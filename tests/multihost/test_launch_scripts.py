"""The launch scripts: shellcheck-clean, dry runs that print the commands, refusals in one line.

Nothing here reaches gcloud, SLURM or ssh: dry runs only print. `multinode.sh --hosts=localhost`
runs for real, as the two local CPU processes of the `two_processes` fixture.
"""

import os
import shlex
import shutil
import subprocess
import time

import pytest

from .conftest import REPO, env, loss_at

LAUNCH = REPO / "launch"
SCRIPTS = ["tpu_vm.sh", "slurm_train.sbatch", "multinode.sh"]


def run(script, *args, extra_env=None, timeout=60):
  e = env()
  for name in list(e):
    if name.startswith("SLURM_"):
      e.pop(name)
  e.update(extra_env or {})
  return subprocess.run(["bash", str(LAUNCH / script), *args], cwd=REPO, env=e,
                        capture_output=True, text=True, timeout=timeout)


def commands(out) -> list[str]:
  return [line[2:] for line in out.stdout.splitlines() if line.startswith("+ ")]


@pytest.mark.parametrize("script", SCRIPTS)
def test_shellcheck(script):
  shellcheck = shutil.which("shellcheck")
  if shellcheck is None:
    pytest.skip("shellcheck is not installed (it comes with the [test] extra)")
  out = subprocess.run([shellcheck, str(LAUNCH / script)], capture_output=True, text=True,
                       timeout=60)
  assert out.returncode == 0, out.stdout


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_are_executable_and_document_themselves(script):
  assert os.access(LAUNCH / script, os.X_OK)
  if script != "slurm_train.sbatch":
    out = run(script, "--help")
    assert out.returncode == 0 and "--yes" in out.stdout


def test_tpu_vm_up_dry_run():
  out = run("tpu_vm.sh", "--name=ts", "--zone=us-east5-a", "--type=v5p-32", "--bucket=gs://runs",
            "--data=gs://runs/data", "--spot", "up", "--", "--config.train.steps=100")
  assert out.returncode == 0, out.stderr
  assert out.stdout.startswith("# dry run")
  cmds = commands(out)
  assert cmds[0] == ("gcloud compute tpus tpu-vm create ts --zone=us-east5-a "
                     "--accelerator-type=v5p-32 --version=tpu-ubuntu2204-base --spot")
  # Everything on the slice runs on all workers at once.
  ssh = [c for c in cmds if " ssh " in c]
  assert ssh and all("--worker=all" in c for c in ssh)
  assert any("gcloud storage cp -r gs://runs/data" in c for c in ssh)
  assert any("gcsfuse" in c and "/mnt/runs" in c for c in ssh)
  train = ssh[-1]
  assert any("uv pip install" in c and "-e '\\''.[tpu]'\\''" in c for c in ssh)
  for part in ("~/venv/bin/python -m tinystories_jax.train", "--workdir=/mnt/runs/ts",
               "--config.mesh.distributed=True", "--config.train.steps=100", "> ~/train.log"):
    assert part in train
  assert "hosts" not in out.stderr


def test_tpu_vm_train_command_starts_once_per_worker(tmp_path):
  """The remote command itself, run as sshd would (`bash -c`), against a stand-in venv python
  that records its start and sleeps: the first run starts it, the second sees it running. The
  guard once matched the shell's own command line, so no worker ever started."""
  out = run("tpu_vm.sh", "--type=v4-32", "--bucket=b", "train")
  [ssh] = [c for c in commands(out) if " ssh " in c]
  [remote] = [a[len("--command="):] for a in shlex.split(ssh) if a.startswith("--command=")]
  remote = remote.replace("/mnt/b/", f"{tmp_path}/mnt/b/")  # the bucket's mount point
  home = tmp_path / "home"
  (home / "tinystories-jax").mkdir(parents=True)
  (home / "venv" / "bin").mkdir(parents=True)
  python = home / "venv" / "bin" / "python"
  python.write_text('#!/usr/bin/env bash\necho started >> "$HOME/started"\n'
                    'exec -a "$0 $*" sleep 30\n')
  python.chmod(0o755)
  e = dict(env(), HOME=str(home))
  try:
    # Returns at once (the ssh session must not wait for training), output captured.
    first = subprocess.run(["bash", "-c", remote], env=e, capture_output=True, text=True,
                           timeout=10)
    assert first.returncode == 0, first.stderr
    for _ in range(100):
      if (home / "started").exists():
        break
      time.sleep(0.05)
    assert "already training" not in first.stdout
    second = subprocess.run(["bash", "-c", remote], env=e, capture_output=True, text=True,
                            timeout=30)
    assert "already training" in second.stdout
    assert (home / "started").read_text().count("started") == 1
    assert (tmp_path / "mnt" / "b" / "tinystories").is_dir()
  finally:
    subprocess.run(["pkill", "-f", f"^{home}/venv/bin/python -m tinystories_jax"], check=False)


def test_tpu_vm_other_commands_dry_run():
  logs = commands(run("tpu_vm.sh", "--worker=2", "logs"))
  assert logs == ["gcloud compute tpus tpu-vm ssh tinystories --zone=us-central2-b --worker=2 "
                  "'--command=tail -n 100 -F ~/train.log'"]
  assert commands(run("tpu_vm.sh", "--project=p", "delete")) == [
      "gcloud compute tpus tpu-vm delete tinystories --zone=us-central2-b --project=p --quiet"]
  resume = run("tpu_vm.sh", "resume")
  cmds = commands(resume)
  assert "describe" in cmds[0] and "delete" in cmds[1] and "create" in cmds[2]
  assert "tinystories_jax.train" in cmds[-1]
  assert "resumes from the latest checkpoint" in resume.stdout


@pytest.mark.parametrize("args, words", [
    (["--type=v4-32", "train"], "pass --bucket=BUCKET"),
    (["--run=a b", "train"], "is not a plain name"),
    (["--frobnicate", "up"], "unknown flag --frobnicate"),
    ([], "no command given"),
    (["launch"], "unknown command launch"),
])
def test_tpu_vm_refusals(args, words):
  out = run("tpu_vm.sh", *args)
  assert out.returncode == 2 and not commands(out)
  assert words in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_slurm_dry_run():
  out = run("slurm_train.sbatch", extra_env={
      "DRY_RUN": "1", "WORKDIR": "/lustre/runs/33m", "TRAIN_FLAGS": "--config.train.steps=100"})
  assert out.returncode == 0, out.stderr
  (cmd,) = commands(out)
  assert cmd.startswith("srun --nodes=2 --ntasks-per-node=8 --kill-on-bad-exit=1 python -m "
                        "tinystories_jax.train --config=configs/tinystories.py:33m "
                        "--workdir=/lustre/runs/33m")
  assert cmd.endswith("--config.train.steps=100")
  # SLURM_* variables tell JAX the layout: no coordinator flags on the command line.
  assert "--coordinator_address" not in cmd
  per_node = commands(run("slurm_train.sbatch", extra_env={"DRY_RUN": "1", "PER": "node"}))
  assert "--ntasks-per-node=1" in per_node[0]
  text = (LAUNCH / "slurm_train.sbatch").read_text()
  assert "#SBATCH --requeue" in text and "scontrol requeue" in text


def test_slurm_refusals():
  out = run("slurm_train.sbatch")
  assert out.returncode == 2 and "not inside a SLURM job" in out.stderr
  out = run("slurm_train.sbatch", extra_env={"DRY_RUN": "1", "PER": "rack"})
  assert out.returncode == 2 and "PER=rack must be gpu or node" in out.stderr


def test_multinode_dry_run():
  out = run("multinode.sh", "--hosts=gpu1,ops@gpu2", "--procs_per_host=2", "--port=9000", "--",
            "--config=configs/tinystories.py:33m", "--workdir=/shared/33m")
  assert out.returncode == 0, out.stderr
  cmds = commands(out)
  assert len(cmds) == 4
  for rank, cmd in enumerate(cmds):
    host = "gpu1" if rank < 2 else "ops@gpu2"
    assert cmd.startswith(f"ssh -n -o BatchMode=yes {host} ")
    assert (f"--coordinator_address=gpu1:9000 --num_processes=4 --process_id={rank} "
            f"--local_device_ids={rank % 2} --config=configs/tinystories.py:33m") in cmd


@pytest.mark.parametrize("args, words", [
    (["--", "--config=c", "--process_id=1"], "--process_id=1 is set by this script"),
    (["--port=0", "--", "--config=c"], "--port=0 is not a port number"),
    (["--procs_per_host=0", "--", "--config=c"], "must be a positive number"),
    ([], "no train flags"),
])
def test_multinode_refusals(args, words):
  out = run("multinode.sh", *args)
  assert out.returncode == 2 and not commands(out)
  assert words in out.stderr


def test_multinode_runs_two_local_processes(two_processes):
  """The script for real on one machine (the `two_processes` run): two CPU processes joined by
  explicit coordinator flags train, log once, and checkpoint together."""
  assert loss_at(two_processes, 3) > 0
  assert (two_processes / "checkpoints" / "3" / "params").is_dir()
  logs = two_processes.with_name(two_processes.name + "-logs")
  assert sorted(p.name for p in logs.iterdir()) == ["process0.log", "process1.log"]
