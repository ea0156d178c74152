"""Device mesh, logical axis rules and host -> device batch placement."""

from tinystories_jax.parallel.mesh import AXES, MeshConfig, MeshError, batch_divisor, make_mesh
from tinystories_jax.parallel.placement import place_batch
from tinystories_jax.parallel.rules import LOGICAL_RULES, logical_names, state_shardings

__all__ = ["AXES", "LOGICAL_RULES", "MeshConfig", "MeshError", "batch_divisor", "logical_names",
           "make_mesh", "place_batch", "state_shardings"]
