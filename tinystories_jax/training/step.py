"""The pure train and eval steps, and the one place they are jitted with explicit shardings.

The train state holds float32 master parameters as a pure dict (the tree `nnx.split(model,
nnx.Param)` gives, without Variable wrappers), so the same tree is what optax updates, what Orbax
saves under "params", and what `sample` / `interop` read back. The model runs in its configured
compute dtype; the loss is float32.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from tinystories_jax.training import loss as loss_lib
from tinystories_jax.training import optimizer as opt_lib


class TrainState(NamedTuple):
  """Everything that changes from step to step (a pytree)."""
  step: jax.Array    # int32 scalar: optimizer steps taken
  params: Any        # pure dict of float32 arrays
  opt_state: Any     # optax state over `params`


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """Static choices that shape the compiled step."""
  loss_impl: str = "fused"       # "plain" | "chunked" | "fused" (training/loss.py)
  loss_chunk: int = 128          # positions per block for the chunked loss
  loss_vocab_multiple: int = loss_lib.VOCAB_MULTIPLE  # fused loss: output rows padded to this
  loss_kernel: str = "auto"      # the fused loss's passes over its logits (loss.LOSS_KERNELS)
  z_loss: float = 0.0            # weight of mean(logsumexp^2); PaLM uses 1e-4
  grad_accum_steps: int = 1      # micro-batches per optimizer step
  skip_nonfinite: bool = False   # drop an update whose loss or gradient is NaN/Inf


def target_mask(batch: Mapping[str, jax.Array]) -> jax.Array:
  """The float32 [B, T] weight of each target: `loss_mask`, and nothing on packing padding."""
  mask = batch["loss_mask"].astype(jnp.float32)
  if "segment_ids" in batch:
    # Segment 0 is packing padding. The pipeline's loss_mask already drops padding and targets
    # that would cross from one story into the next; this guards batches built elsewhere.
    mask = mask * (batch["segment_ids"] > 0)
  return mask


def forward_sums(graphdef: nnx.GraphDef, params: Any, extra: Any,
                 batch: Mapping[str, jax.Array], cfg: StepConfig) -> loss_lib.LossSums:
  """Loss sums of one (micro-)batch: runs the model to its hidden states, then the output loss."""
  model = nnx.merge(graphdef, params, extra) if extra else nnx.merge(graphdef, params)
  h_btd = model.hidden(batch["inputs"], positions_bt=batch.get("positions"),
                       segment_ids_bt=batch.get("segment_ids"))
  return loss_lib.loss_sums(h_btd, model.output_embedding(), batch["targets"],
                            target_mask(batch), impl=cfg.loss_impl, chunk=cfg.loss_chunk,
                            vocab_multiple=cfg.loss_vocab_multiple,
                            kernel=cfg.loss_kernel)


def _split_micro(batch: Mapping[str, jax.Array], accum: int) -> dict[str, jax.Array]:
  # [A*B, ...] -> [A, B, ...] taking rows A apart, so each device's contiguous rows stay on it.
  def split(x):
    x = x.reshape((x.shape[0] // accum, accum) + x.shape[1:])
    return jnp.swapaxes(x, 0, 1)
  return {k: split(v) for k, v in batch.items()}


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, cfg: StepConfig) -> Callable:
  """Returns `train_step(state, extra, batch) -> (state, metrics)`, pure and unjitted.

  The objective is (sum of NLL + z_loss * sum of logsumexp^2) / (number of targets) over the
  whole step's batch, so accumulating A micro-batches gives the same gradient as one batch A
  times larger.
  """

  def micro_grads(params, extra, micro):
    def objective(p):
      s = forward_sums(graphdef, p, extra, micro, cfg)
      # Without a z-loss, z stays out of what is differentiated (the fused loss then skips
      # its gradient's terms: a symbolic zero, not a multiplication by 0).
      return (s.nll + cfg.z_loss * s.z if cfg.z_loss else s.nll), s
    (_, sums), grads = jax.value_and_grad(objective, has_aux=True)(params)
    return grads, sums

  def train_step(state: TrainState, extra: Any, batch: Mapping[str, jax.Array]):
    if cfg.grad_accum_steps == 1:
      grads, sums = micro_grads(state.params, extra, batch)
    else:
      def body(carry, micro):
        g_acc, s_acc = carry
        g, s = micro_grads(state.params, extra, micro)
        return (jax.tree.map(jnp.add, g_acc, g),
                loss_lib.LossSums(*(a + b for a, b in zip(s_acc, s)))), None
      zero_g = jax.tree.map(jnp.zeros_like, state.params)
      zero = jnp.zeros((), jnp.float32)
      (grads, sums), _ = jax.lax.scan(body, (zero_g, loss_lib.LossSums(zero, zero, zero)),
                                      _split_micro(batch, cfg.grad_accum_steps))
    count = jnp.maximum(sums.count, 1.0)
    grads = jax.tree.map(lambda g: g / count, grads)
    grad_norm = opt_lib.global_norm(tx, grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    loss = sums.nll / count
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    if cfg.skip_nonfinite:
      keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
      params = keep(params, state.params)
      opt_state = keep(opt_state, state.opt_state)
    metrics = {
        "train_loss": loss,
        "z_loss": sums.z / count,
        "grad_norm": grad_norm,
        "learning_rate": jnp.asarray(schedule(state.step), jnp.float32),
        "targets": sums.count,
        "finite": finite,
    }
    return TrainState(state.step + 1, params, opt_state), metrics

  return train_step


def make_eval_step(graphdef: nnx.GraphDef, cfg: StepConfig) -> Callable:
  """Returns `eval_step(params, extra, batch) -> LossSums` (sums over the batch's targets)."""
  def eval_step(params, extra, batch):
    return forward_sums(graphdef, params, extra, batch, cfg)
  return eval_step


def on_mesh(fn: Callable, mesh: jax.sharding.Mesh) -> Callable:
  """`fn` traced with `mesh` as the abstract mesh.

  The Pallas kernels (attention, the loss's passes) are opaque to XLA's partitioner, which
  would gather their operands onto every device; they read the abstract mesh to run per shard
  under `jax.shard_map` instead, and jit does not set it from the shardings it is given.
  """
  @functools.wraps(fn)
  def traced(*args, **kwargs):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args, **kwargs)
  return traced


def jit_train_step(train_step: Callable, state_shardings: TrainState, extra_shardings: Any,
                   batch_shardings: Mapping[str, Any], mesh: jax.sharding.Mesh) -> Callable:
  """Jits the train step with explicit shardings; the incoming state's buffers are donated."""
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.jit(on_mesh(train_step, mesh),
                 in_shardings=(state_shardings, extra_shardings, dict(batch_shardings)),
                 out_shardings=(state_shardings, replicated),
                 donate_argnums=(0,))


def jit_eval_step(eval_step: Callable, param_shardings: Any, extra_shardings: Any,
                  batch_shardings: Mapping[str, Any], mesh: jax.sharding.Mesh) -> Callable:
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.jit(on_mesh(eval_step, mesh),
                 in_shardings=(param_shardings, extra_shardings, dict(batch_shardings)),
                 out_shardings=replicated)
