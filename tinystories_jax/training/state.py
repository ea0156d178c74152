"""Creating the train state directly sharded: eval_shape -> logical specs -> jitted init.

No parameter ever exists unsharded on one device: the model is traced abstractly to learn its
shapes and logical axis names, those become NamedShardings through `parallel.rules`, and the real
initialisation runs inside `jax.jit` with those shardings as its outputs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from tinystories_jax import models
from tinystories_jax.parallel import rules
from tinystories_jax.training.step import TrainState


def _build(model_cfg, seed: int):
  # Models annotate parameters with logical names, not mesh axes; placing them is our job, so
  # Flax must not try to shard each variable eagerly as it is created.
  with nnx.use_eager_sharding(False):
    return models.build(model_cfg, nnx.Rngs(seed))


def _split(model):
  graphdef, params, extra = nnx.split(model, nnx.Param, ...)
  return graphdef, params, extra


@dataclasses.dataclass(frozen=True)
class ModelLayout:
  """What the trainer needs to know about a model before any parameter exists."""
  graphdef: nnx.GraphDef
  abstract_params: Any      # pure dict of ShapeDtypeStruct
  logical_names: Any        # pure dict of tuples of logical axis names
  abstract_extra: Any       # non-parameter variables (usually empty), pure dict
  num_params: int


def model_layout(model_cfg) -> ModelLayout:
  """Traces the model abstractly (no FLOPs, no memory) to get its structure and axis names."""
  abstract = nnx.eval_shape(lambda: _build(model_cfg, 0))
  graphdef, params, extra = _split(abstract)
  pure = nnx.to_pure_dict(params)
  return ModelLayout(
      graphdef=graphdef,
      abstract_params=pure,
      logical_names=rules.logical_names(params),
      abstract_extra=nnx.to_pure_dict(extra),
      num_params=sum(x.size for x in jax.tree.leaves(pure)),
  )


@dataclasses.dataclass(frozen=True)
class StateShardings:
  state: TrainState
  params: Any
  extra: Any


def state_shardings(layout: ModelLayout, tx: Any, mesh: jax.sharding.Mesh) -> StateShardings:
  """NamedShardings for the whole train state: optimizer moments follow their parameters (or,
  where the update groups parameters into flat vectors, those vectors: replicated).

  Raises:
    optimizer.FlattenedSplitError: the update flattens parameters that the mesh splits.
  """
  replicated = rules.replicated(mesh)
  params = rules.state_shardings(layout.abstract_params, layout.logical_names, mesh)
  abstract_opt = jax.eval_shape(tx.init, layout.abstract_params)
  groups = getattr(tx, "groups", None)
  opt = optax.tree_map_params(
      tx if groups is None else tx.inner, lambda _, s: s, abstract_opt,
      params if groups is None else groups.grouped_shardings(params, replicated),
      transform_non_params=lambda _: replicated,
      is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))
  extra = jax.tree.map(lambda _: replicated, layout.abstract_extra)
  return StateShardings(TrainState(replicated, params, opt), params, extra)


def abstract_state(layout: ModelLayout, tx: optax.GradientTransformation,
                   shardings: StateShardings) -> TrainState:
  """The train state as ShapeDtypeStructs carrying their target shardings (for restores)."""
  shapes = TrainState(jax.ShapeDtypeStruct((), jnp.int32), layout.abstract_params,
                      jax.eval_shape(tx.init, layout.abstract_params))
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      shapes, shardings.state)


def initialiser(model_cfg, tx: optax.GradientTransformation, shardings: StateShardings,
                seed: int):
  """The jitted function `init_state` compiles and calls once (for compiling it alone)."""
  def init():
    _, params, extra = _split(_build(model_cfg, seed))
    params = nnx.to_pure_dict(params)
    state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))
    return state, nnx.to_pure_dict(extra)

  return jax.jit(init, out_shardings=(shardings.state, shardings.extra))


def init_state(model_cfg, tx: optax.GradientTransformation, shardings: StateShardings,
               seed: int) -> tuple[TrainState, Any]:
  """Initialises parameters and optimizer state on the mesh, already sharded.

  Returns:
    `(state, extra)`: the train state at step 0 and the non-parameter variables.
  """
  return _run_once(initialiser(model_cfg, tx, shardings, seed))


def _run_once(jitted) -> Any:
  """Compiles and calls a function that runs once per process (initialisers).

  On CPU, LLVM's optimisation of the random-number code dominates: -O0 compiles a 5-layer model's
  initialiser several times faster (still so with the grouped draws of `models.build`), and the
  code runs once, so its speed does not matter.
  """
  options = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else {}
  return jitted.lower().compile(options)()


def init_extra(model_cfg, shardings: StateShardings) -> Any:
  """Only the non-parameter variables (when the parameters come from a checkpoint)."""
  def init():
    return nnx.to_pure_dict(_split(_build(model_cfg, 0))[2])
  return _run_once(jax.jit(init, out_shardings=shardings.extra))
