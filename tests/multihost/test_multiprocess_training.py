"""Real processes on loopback train the same run as one process, and trade checkpoints with it.

One process with 4 CPU devices (a `data` axis of 4) is the reference. Two processes with 2
devices each (started by `launch/multinode.sh`, parameters sharded over both processes; see
conftest), and four with 2 each (`data` across all of them), train the same global batch of 8 rows
through `jax.distributed`; their loss must match the reference. Checkpoints written by two
processes resume in one, and the other way round, and continue exactly where one uninterrupted
process goes.
"""

import json
import shutil

import pytest

from .conftest import ACROSS_PROCESSES, Group, loss_at, metrics, shared_dir, tiny_overrides

# Same global batch and same arithmetic; only the reduction order of the all-reduce differs.
TOL = 2e-4


@pytest.fixture(scope="module")
def reference(mh_data, tmp_path_factory):
  """One process, 4 devices, 5 steps; checkpoints at 3 and 5, losses logged at 3 and 5."""
  with shared_dir(tmp_path_factory, "multihost-one") as (workdir, build):
    if build:
      Group(workdir, 1, 4, tiny_overrides(mh_data, **{"train.steps": 5})).check()
  return workdir


def test_two_processes_reach_the_loss_of_one(reference, two_processes):
  workdir = two_processes
  assert loss_at(workdir, 3) == pytest.approx(loss_at(reference, 3), abs=TOL)
  # Process 0 alone writes the metrics (one row per logged step) and reports progress.
  assert [r["step"] for r in metrics(workdir)] == [3]
  logs = workdir.with_name(workdir.name + "-logs")
  assert "step 3: train_loss" in (logs / "process0.log").read_text()
  assert "step 3: train_loss" not in (logs / "process1.log").read_text()
  assert json.loads((workdir / "config.json").read_text())["train"]["batch_size"] == 8
  # Each process wrote its own shards of the checkpoint.
  for item in ("params", "opt_state"):
    written = {p.name for p in (workdir / "checkpoints" / "3" / item).iterdir()}
    assert {"ocdbt.process_0", "ocdbt.process_1"} <= written, written


@pytest.mark.slow
def test_four_processes_reach_the_loss_of_one(reference, mh_data, tmp_path):
  workdir = tmp_path / "four"
  Group(workdir, 4, 2, tiny_overrides(mh_data)).check()
  assert loss_at(workdir, 3) == pytest.approx(loss_at(reference, 3), abs=TOL)
  assert [r["step"] for r in metrics(workdir)] == [3]


def test_checkpoint_of_two_processes_resumes_in_one(reference, two_processes, mh_data, tmp_path):
  workdir = tmp_path / "two-then-one"
  shutil.copytree(two_processes, workdir)
  Group(workdir, 1, 4, tiny_overrides(mh_data, **{"train.steps": 5})).check()
  assert "Resumed from step 3" in (workdir.with_name(workdir.name + "-logs") /
                                   "process0.log").read_text()
  assert loss_at(workdir, 5) == pytest.approx(loss_at(reference, 5), abs=TOL)


def test_checkpoint_of_one_process_resumes_in_two(reference, mh_data, tmp_path):
  workdir = tmp_path / "one-then-two"
  shutil.copytree(reference, workdir)
  # Roll the copy back to its step-3 checkpoint: drop step 5 and the rows logged after step 3.
  shutil.rmtree(workdir / "checkpoints" / "5")
  rows = [r for r in metrics(workdir) if r["step"] <= 3]
  (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  group = Group(workdir, 2, 2, tiny_overrides(mh_data, **{"train.steps": 5}, **ACROSS_PROCESSES))
  group.check()
  assert "Resumed from step 3" in group.log(0)
  assert loss_at(workdir, 5) == pytest.approx(loss_at(reference, 5), abs=TOL)
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["3", "5"]
