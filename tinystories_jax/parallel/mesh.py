"""The device mesh: axes `data`, `fsdp`, `tensor`, built from the config's sizes.

`data` replicates parameters and splits the batch; `fsdp` splits the batch and shards parameters
along their `embed` dimension; `tensor` shards heads, MLP width and vocabulary. A size of -1 takes
whatever devices the other axes leave.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


class MeshError(ValueError):
  """A mesh shape that cannot be laid over the available devices (message says how to fix it)."""


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Requested mesh axis sizes; -1 means "the rest of the devices" (at most one axis)."""
  data: int = -1
  fsdp: int = 1
  tensor: int = 1

  def sizes(self) -> tuple[int, int, int]:
    return (self.data, self.fsdp, self.tensor)


def resolve_shape(cfg: MeshConfig, num_devices: int,
                  platform: str | None = None) -> tuple[int, int, int]:
  """Turns the requested sizes into concrete ones that multiply to `num_devices`.

  `platform` "cpu" adds to a too-large mesh's error how to get more CPU devices.

  Raises:
    MeshError: the sizes are invalid or do not divide the device count.
  """
  sizes = list(cfg.sizes())
  spec = ", ".join(f"mesh.{n}={s}" for n, s in zip(AXES, sizes))
  if any(s == 0 or s < -1 for s in sizes):
    raise MeshError(f"Mesh sizes must be positive or -1 (got {spec}); set each of mesh.data, "
                    "mesh.fsdp, mesh.tensor to a positive size or -1.")
  if sizes.count(-1) > 1:
    raise MeshError(f"At most one mesh axis may be -1 (got {spec}); give the others explicit "
                    "sizes.")
  fixed = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % fixed:
      raise MeshError(f"The mesh ({spec}) does not divide the {num_devices} available devices: "
                      f"the fixed axes need a multiple of {fixed}; choose sizes whose product "
                      f"divides {num_devices}.")
    sizes[sizes.index(-1)] = num_devices // fixed
  elif fixed != num_devices:
    hint = (f" On a CPU, --config.mesh.cpu_devices={fixed} splits it into {fixed} devices."
            if platform == "cpu" and fixed > num_devices else "")
    raise MeshError(f"The mesh ({spec}) uses {fixed} devices but {num_devices} are available; "
                    f"make the sizes multiply to {num_devices} or set one of them to -1.{hint}")
  return tuple(sizes)


def make_mesh(cfg: MeshConfig, devices=None) -> jax.sharding.Mesh:
  """Builds the `(data, fsdp, tensor)` mesh over `devices` (default: all devices)."""
  devices = jax.devices() if devices is None else list(devices)
  shape = resolve_shape(cfg, len(devices), devices[0].platform if devices else None)
  # Auto axes: the step gives explicit in/out shardings and lets XLA propagate the rest
  # (jax.make_mesh would default to Explicit axes, which type-check every intermediate).
  auto = (jax.sharding.AxisType.Auto,) * len(AXES)
  if len(devices) == len(jax.devices()):
    slices = {getattr(d, "slice_index", 0) for d in devices}
    if len(slices) > 1:
      # Several TPU slices joined over the data-centre network: jax.make_mesh refuses them.
      return jax.sharding.Mesh(hybrid_device_grid(shape, devices), AXES, axis_types=auto)
    # jax.make_mesh orders devices for the physical topology (ICI rings on TPU, NVLink on GPU);
    # devices come in process order, so the outermost axis, `data`, is the one spanning hosts.
    return jax.make_mesh(shape, AXES, axis_types=auto, devices=devices)
  return jax.sharding.Mesh(np.asarray(devices).reshape(shape), AXES, axis_types=auto)


def hybrid_device_grid(shape: tuple[int, int, int], devices, *,
                       process_is_granule: bool = False) -> np.ndarray:
  """Devices laid out so that only a batch axis crosses the slow links between granules.

  A granule is a TPU slice (devices sharing `slice_index`) or, with `process_is_granule`, a
  process. Inside a granule devices talk over ICI / NVLink; between granules over DCN, which is
  an order of magnitude slower. The granules are split along `data` (one gradient all-reduce per
  step crosses DCN), or along `fsdp` when `data` does not divide by their number; `tensor`, which
  communicates inside every layer, never crosses.

  Raises:
    MeshError: neither batch axis divides by the number of granules.
  """
  attr = "process_index" if process_is_granule else "slice_index"
  granules = len({getattr(d, attr) for d in devices})
  ici, dcn = list(shape), [1, 1, 1]
  for axis in range(len(BATCH_AXES)):
    if ici[axis] % granules == 0:
      ici[axis] //= granules
      dcn[axis] = granules
      break
  else:
    kind = "processes" if process_is_granule else "TPU slices"
    raise MeshError(f"The mesh (data={shape[0]}, fsdp={shape[1]}, tensor={shape[2]}) cannot "
                    f"split over {granules} {kind}: make mesh.data (or mesh.fsdp) a multiple of "
                    f"{granules} so that only a batch axis crosses the network between them.")
  from jax.experimental import mesh_utils  # pylint: disable=g-import-not-at-top
  return mesh_utils.create_hybrid_device_mesh(ici, dcn, devices,
                                              process_is_granule=process_is_granule)


def batch_divisor(mesh: jax.sharding.Mesh) -> int:
  """How many ways the batch dimension is split: the product of the batch axes."""
  return math.prod(mesh.shape[a] for a in BATCH_AXES)
