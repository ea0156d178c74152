"""Running a row-wise Pallas kernel per device under a mesh.

A Pallas call is opaque to XLA's partitioner, which would gather its whole operands onto every
device. Kernels whose rows are independent (the loss passes, the RMSNorm) run instead inside
`jax.shard_map` over the batch: each device handles its own rows.
"""

from __future__ import annotations

import jax

# Mesh axes the rows (batch) may be split over.
BATCH_AXES = ("data", "fsdp")


def rows_sharded(fn, row_args, other_args=()):
  """`fn(*row_args, *other_args)`, on each device's rows under a multi-device mesh; directly
  otherwise.

  Axis 0 of every array in `row_args` (None entries allowed) is split over the mesh's `data`
  and `fsdp` axes that divide it, and so is axis 0 of every output; `other_args` and any other
  axis (a vocabulary or width sharded over `tensor`) are gathered whole onto each device. Under
  autodiff the gradients of `other_args` are summed over the devices. Inside a caller's
  `shard_map`, that call needs `check_vma=False` (as for `flash_attention`).
  """
  row_args, other_args = tuple(row_args), tuple(other_args)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return fn(*row_args, *other_args)
  sizes = {name: size for (name, size), kind in zip(mesh.shape.items(), mesh.axis_types)
           if kind != jax.sharding.AxisType.Manual}
  rows = next(a.shape[0] for a in row_args if a is not None)
  axes, split = [], 1
  for axis in BATCH_AXES:
    if sizes.get(axis, 1) > 1 and rows % (split * sizes[axis]) == 0:
      axes.append(axis)
      split *= sizes[axis]
  if not axes:
    return fn(*row_args, *other_args)
  P = jax.sharding.PartitionSpec  # noqa: N806
  row_spec = lambda x: P(tuple(axes), *([None] * (x.ndim - 1)))  # noqa: E731
  in_specs = (tuple(jax.tree.map(row_spec, a) for a in row_args)
              + tuple(jax.tree.map(lambda x: P(*([None] * x.ndim)), a) for a in other_args))
  out = jax.eval_shape(fn, *row_args, *other_args)
  return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=jax.tree.map(row_spec, out),
                       check_vma=False)(*row_args, *other_args)
