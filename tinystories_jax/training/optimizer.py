"""AdamW with a weight-decay mask, learning-rate schedules and global-norm clipping (optax)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

SCHEDULES = ("constant", "cosine", "linear")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """The optimizer section of a run config (see `configs/base.py` for each field's meaning)."""
  lr: float = 5e-4
  schedule: str = "constant"
  warmup_steps: int = 0
  final_lr_ratio: float = 0.0
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1
  clip_norm: float = 0.0
  decay_embeddings: bool = False
  decay_norms_and_biases: bool = False
  flatten_below: int = 0


def learning_rate(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
  """Linear warmup to `lr`, then constant, cosine or linear decay to `lr * final_lr_ratio`."""
  if cfg.schedule not in SCHEDULES:
    raise ValueError(f"optimizer.schedule={cfg.schedule!r} is not one of {SCHEDULES}.")
  warmup = max(0, min(cfg.warmup_steps, total_steps))
  end = cfg.lr * cfg.final_lr_ratio
  decay_steps = max(1, total_steps - warmup)
  if cfg.schedule == "constant":
    after = optax.constant_schedule(cfg.lr)
  elif cfg.schedule == "cosine":
    after = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.final_lr_ratio)
  else:
    after = optax.linear_schedule(cfg.lr, end, decay_steps)
  if warmup == 0:
    return after
  # Step 0 gets lr/warmup rather than 0, so the first step is never a no-op.
  ramp = optax.linear_schedule(cfg.lr / warmup, cfg.lr, warmup - 1) if warmup > 1 else (
      optax.constant_schedule(cfg.lr))
  return optax.join_schedules([ramp, after], [warmup])


def decay_mask(logical_names: Any, params: Any, cfg: OptimizerConfig) -> Any:
  """True where weight decay applies.

  Norm scales and biases (1-D parameters) and embedding tables (a `vocab` or `positions` logical
  axis: token embeddings, the learned position table, an untied output head) are exempt unless the
  config says otherwise — decaying them pulls rare tokens' rows to zero and fights the norms.
  """
  def decays(names, x):
    if x.ndim < 2:
      return cfg.decay_norms_and_biases
    if "vocab" in names or "positions" in names:
      return cfg.decay_embeddings
    return True
  return jax.tree.map(decays, logical_names, params, is_leaf=lambda n: isinstance(n, tuple))


class FlattenedSplitError(ValueError):
  """`flatten_below` flattens parameters that the mesh splits (a configuration mistake)."""


class LeafGroups:
  """The parameters the update takes together (`OptimizerConfig.flatten_below`).

  Every parameter with fewer than `below` elements goes into one flat vector per weight-decay
  setting and dtype, in tree order; the others stay as they are. AdamW and the clipping norm
  then run over a few flat vectors instead of one small kernel or two per parameter. The grouped
  tree is `{"flat": {name: vector}, "leaves": (the larger parameters, in tree order)}`.
  """

  def __init__(self, abstract_params: Any, mask: Any, below: int):
    leaves, self.treedef = jax.tree.flatten(abstract_params)
    decays = self.treedef.flatten_up_to(mask)
    self.shapes = [tuple(x.shape) for x in leaves]
    self.flat: dict[str, list[int]] = {}
    self.flat_decays: dict[str, bool] = {}
    self.large: list[int] = []
    for i, (x, d) in enumerate(zip(leaves, decays)):
      if x.size < below:
        name = f"{'decayed' if d else 'exempt'}_{jnp.dtype(x.dtype).name}"
        self.flat.setdefault(name, []).append(i)
        self.flat_decays[name] = bool(d)
      else:
        self.large.append(i)
    self.decays = decays

  def group(self, tree: Any) -> dict[str, Any]:
    leaves = self.treedef.flatten_up_to(tree)
    return {"flat": {name: jnp.concatenate([jnp.ravel(leaves[i]) for i in idx])
                     for name, idx in self.flat.items()},
            "leaves": tuple(leaves[i] for i in self.large)}

  def ungroup(self, grouped: dict[str, Any]) -> Any:
    leaves: list[Any] = [None] * len(self.shapes)
    for name, idx in self.flat.items():
      start = 0
      for i in idx:
        size = int(np.prod(self.shapes[i], dtype=np.int64))
        leaves[i] = grouped["flat"][name][start:start + size].reshape(self.shapes[i])
        start += size
    for i, x in zip(self.large, grouped["leaves"]):
      leaves[i] = x
    return self.treedef.unflatten(leaves)

  def grouped_mask(self) -> dict[str, Any]:
    return {"flat": dict(self.flat_decays), "leaves": tuple(self.decays[i] for i in self.large)}

  def grouped_shardings(self, param_shardings: Any, replicated: Any) -> dict[str, Any]:
    """The shardings of the grouped tree: the flat vectors replicated, which the parameters in
    them must be (a flat vector mixes them, so it cannot follow one parameter's split)."""
    shardings = self.treedef.flatten_up_to(param_shardings)
    split = [i for idx in self.flat.values() for i in idx
             if not shardings[i].is_fully_replicated]
    if split:
      raise FlattenedSplitError(
          f"optimizer.flatten_below flattens {len(split)} parameters that this mesh splits over "
          "its fsdp or tensor axis; set optimizer.flatten_below=0 (or one below their sizes) or "
          "use a mesh that keeps them whole.")
    return {"flat": {name: replicated for name in self.flat},
            "leaves": tuple(shardings[i] for i in self.large)}


class GroupedTransformation(NamedTuple):
  """An optax transformation run on `groups.group(...)` of its inputs (`inner`)."""
  init: Callable
  update: Callable
  inner: optax.GradientTransformation
  groups: LeafGroups


def _grouped(inner: optax.GradientTransformation, groups: LeafGroups) -> GroupedTransformation:
  def init(params):
    return inner.init(groups.group(params))

  def update(updates, state, params=None):
    grouped, state = inner.update(groups.group(updates), state,
                                  None if params is None else groups.group(params))
    return groups.ungroup(grouped), state

  return GroupedTransformation(init, update, inner, groups)


def global_norm(tx: Any, grads: Any) -> jax.Array:
  """The gradient's global norm, taken as the clipping takes it (over the grouped vectors when
  `tx` groups parameters, so the two are one computation)."""
  groups = getattr(tx, "groups", None)
  return optax.tree.norm(grads if groups is None else groups.group(grads))


def make_optimizer(cfg: OptimizerConfig, total_steps: int, logical_names: Any,
                   abstract_params: Any) -> optax.GradientTransformation | GroupedTransformation:
  """The full update rule: clip by global norm (if `clip_norm` > 0), then masked AdamW.

  With `flatten_below` > 0 the same rule runs on `LeafGroups` of the parameters: the same
  arithmetic for every element (only the norm's sum runs in another order), in fewer kernels.
  """
  schedule = learning_rate(cfg, total_steps)
  mask = decay_mask(logical_names, abstract_params, cfg)
  groups = LeafGroups(abstract_params, mask, cfg.flatten_below) if cfg.flatten_below > 0 else None
  if groups is not None and not groups.flat:
    groups = None  # no parameter is that small: the plain update
  parts = []
  if cfg.clip_norm > 0:
    parts.append(optax.clip_by_global_norm(cfg.clip_norm))
  parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                           weight_decay=cfg.weight_decay,
                           mask=mask if groups is None else groups.grouped_mask()))
  tx = optax.chain(*parts)
  return tx if groups is None else _grouped(tx, groups)
