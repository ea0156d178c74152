"""AdamW with a weight-decay mask, learning-rate schedules and global-norm clipping (optax)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
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


def make_optimizer(cfg: OptimizerConfig, total_steps: int, logical_names: Any,
                   abstract_params: Any) -> optax.GradientTransformation:
  """The full update rule: clip by global norm (if `clip_norm` > 0), then masked AdamW."""
  schedule = learning_rate(cfg, total_steps)
  mask = decay_mask(logical_names, abstract_params, cfg)
  parts = []
  if cfg.clip_norm > 0:
    parts.append(optax.clip_by_global_norm(cfg.clip_norm))
  parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                           weight_decay=cfg.weight_decay, mask=mask))
  return optax.chain(*parts)
