"""Across processes the `data` axis is the one that spans hosts, and collectives run over gloo."""

import json
import subprocess
import sys

from .conftest import REPO, env, free_port

PROBE = REPO / "tests" / "multihost" / "mesh_probe.py"


def test_data_axis_spans_processes():
  address, n = f"127.0.0.1:{free_port()}", 2
  procs = [subprocess.Popen([sys.executable, str(PROBE), address, str(n), str(i), "4"],
                            cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True) for i in range(n)]
  outs = []
  try:
    for p in procs:
      out, err = p.communicate(timeout=300)
      assert p.returncode == 0, err[-3000:]
      outs.append(json.loads(out.strip().splitlines()[-1]))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for out in outs:
    assert out["joined"] and out["process_count"] == 2 and out["device_count"] == 8
    assert out["shape"] == {"data": 4, "fsdp": 2, "tensor": 1}
    # Each fsdp x tensor block lives on one process; moving along `data` changes process.
    for grid in (out["mesh_owner"], out["hybrid_owner"]):
      rows = [{owner for fsdp in row for owner in fsdp} for row in grid]
      assert all(len(r) == 1 for r in rows)
      assert sorted(r.pop() for r in rows) == [0, 0, 1, 1]
    # Rows 0-3 came from process 0 (value 0), rows 4-7 from process 1 (value 1).
    assert out["total"] == 4.0
