"""Run as one process of a loopback job: prints the mesh layout as JSON (see test_mesh_layout.py).

  python mesh_probe.py COORDINATOR NUM_PROCESSES PROCESS_ID DEVICES_PER_PROCESS
"""

import json
import sys

import jax
import numpy as np

from tinystories_jax.parallel import distributed, mesh, rules


def main(address, num, rank, devices):
  jax.config.update("jax_num_cpu_devices", devices)
  joined = distributed.initialize(distributed.DistributedOptions(
      address, num, rank, init_timeout_s=120, heartbeat_timeout_s=20))
  m = mesh.make_mesh(mesh.MeshConfig(data=-1, fsdp=2))
  owner = np.vectorize(lambda d: d.process_index)
  hybrid = mesh.hybrid_device_grid(tuple(m.devices.shape), jax.devices(), process_is_granule=True)
  # A real cross-process computation: each process contributes its rank to every row it owns.
  local = np.full((4, 1), float(rank), np.float32)
  x = jax.make_array_from_process_local_data(rules.batch_sharding(m, 2), local,
                                             (4 * num, 1))
  total = jax.jit(lambda a: a.sum(), out_shardings=rules.replicated(m))(x)
  print(json.dumps({"joined": joined, "process_count": jax.process_count(),
                    "device_count": jax.device_count(), "shape": dict(m.shape),
                    "mesh_owner": owner(m.devices).tolist(),
                    "hybrid_owner": owner(hybrid).tolist(), "total": float(total)}), flush=True)


if __name__ == "__main__":
  main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
