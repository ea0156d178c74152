"""Orbax checkpoints of a training run: parameters, optimizer state, data position, metadata.

Layout under WORKDIR/checkpoints/<step>/ (one Orbax composite checkpoint per step):
  params     the float32 parameters as a pure dict (what `sample` / `interop` read)
  opt_state  the optax state
  data_iter  the Grain iterator's state (JSON)
  meta       step, RNG key data and the run config (JSON)

Orbax writes each step into a temporary directory and renames it only once every item is complete,
so a process killed mid-save leaves no step that looks finished. A step that still fails to read
(a damaged disk, a hand-deleted file) is skipped with a warning, moved to
WORKDIR/checkpoints-unreadable/<step>-<time>/ (so the resumed run can save that step again), and the
previous one is used.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

ITEMS = ("params", "opt_state", "data_iter", "meta")


@dataclasses.dataclass
class Restored:
  """What a restore found. `opt_state`, `data_iter` and `meta` are None for params-only steps
  (a workdir written by `interop import-*`)."""
  step: int
  params: Any
  opt_state: Any | None
  data_iter: dict | None
  meta: dict | None


class Checkpointer:
  """Saves and restores a run's checkpoints in `directory` (normally WORKDIR/checkpoints)."""

  def __init__(self, directory: str, *, keep: int, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        enable_async_checkpointing=async_save,
        create=True,
        # Leftovers of a save that was killed part-way are deleted, never read.
        cleanup_tmp_directories=True,
    )
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, *, params: Any, opt_state: Any, data_iter: dict, meta: dict) -> None:
    """Starts saving `step` (returns once the arrays are copied off the devices)."""
    args = ocp.args.Composite(
        params=ocp.args.StandardSave(params),
        opt_state=ocp.args.StandardSave(opt_state),
        data_iter=ocp.args.JsonSave(data_iter),
        meta=ocp.args.JsonSave(dict(meta, step=int(step))),
    )
    self._manager.save(step, args=args, force=True)

  def wait(self) -> None:
    """Blocks until every started save is on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

  def _items_at(self, step: int) -> set[str]:
    path = os.path.join(self.directory, str(step))
    if not os.path.isdir(path):
      return set()
    return {name for name in os.listdir(path) if name in ITEMS}

  def _restore_step(self, step: int, abstract_params: Any, abstract_opt_state: Any) -> Restored:
    items = self._items_at(step)
    if "params" not in items:
      raise ValueError(f"step {step} has no 'params' item")
    full = {"opt_state", "meta", "data_iter"} <= items
    args = {"params": ocp.args.StandardRestore(abstract_params)}
    if full:
      args.update(opt_state=ocp.args.StandardRestore(abstract_opt_state),
                  data_iter=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore())
    out = self._manager.restore(step, args=ocp.args.Composite(**args))
    _check_tree(out["params"], abstract_params, "params")
    if not full:
      return Restored(step, out["params"], None, None, None)
    _check_tree(out["opt_state"], abstract_opt_state, "opt_state")
    return Restored(step, out["params"], out["opt_state"], dict(out["data_iter"]),
                    dict(out["meta"]))

  def _set_aside(self, step: int) -> str | None:
    """Moves an unreadable step out of the checkpoint directory (kept for a look, never read
    again), so that the run, resumed from an older step, can save that step number anew.
    Process 0 moves it; every process then reloads the step list (after a barrier when there
    are several), since each would otherwise refuse to save a step it still lists."""
    src = os.path.join(self.directory, str(step))
    dst = os.path.join(self.directory + "-unreadable", f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
    moved = None
    if jax.process_index() == 0:
      try:
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        os.rename(src, dst)
        moved = dst
      except OSError as e:
        logging.warning("Could not move the unreadable step %d aside (%s); saving that step "
                        "again will fail until %s is removed.", step, e, src)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices(f"checkpoint step {step} set aside")
    self._manager.reload()
    return moved

  def restore_latest(self, abstract_params: Any, abstract_opt_state: Any) -> Restored | None:
    """Restores the newest readable step onto the shardings in the abstract trees.

    Args:
      abstract_params: ShapeDtypeStructs with `.sharding` for the parameters; a checkpoint
        written on another mesh shape is resharded onto these.
      abstract_opt_state: the same for the optimizer state.

    Returns:
      The restored step, or None if the directory holds no checkpoint.
    """
    # Newest first, but a training checkpoint before any params-only one: an imported model's
    # step is where training started from, never where it has got to.
    steps = sorted(self.steps(), key=lambda s: ("opt_state" in self._items_at(s), s),
                   reverse=True)
    for i, step in enumerate(steps):
      try:
        return self._restore_step(step, abstract_params, abstract_opt_state)
      except Exception as e:  # pylint: disable=broad-except
        # Any failure to read one step (truncated array file, missing item, bad JSON) means that
        # step is unusable; an older complete one is better than stopping.
        _quiet_abandoned_reads()
        fallback = (f"falling back to step {steps[i + 1]}" if i + 1 < len(steps)
                    else "no older checkpoint remains")
        moved = self._set_aside(step)
        logging.warning("Checkpoint step %d in %s is unreadable (%s: %s); %s. %s", step,
                        self.directory, type(e).__name__, str(e).splitlines()[0][:300], fallback,
                        f"It was moved to {moved}." if moved else "")
    if steps:
      raise RuntimeError(f"No checkpoint in {self.directory} could be read (tried steps {steps}); "
                         "move the directory away to start fresh.")
    return None


def _quiet_abandoned_reads() -> None:
  """After a failed restore, the other reads of that step still complete in TensorStore's
  threads and try to wake the restore's event loop, which has closed: each prints an ignored
  `RuntimeError: Event loop is closed` traceback (a dozen for one damaged step). They are
  harmless, and the step's failure is already reported in one line, so this drops exactly those
  from `sys.unraisablehook` (installed once; everything else goes to the previous hook)."""
  previous = sys.unraisablehook
  if getattr(previous, "drops_closed_loop_wakeups", False):
    return

  def hook(unraisable):
    if (isinstance(unraisable.exc_value, RuntimeError)
        and str(unraisable.exc_value) == "Event loop is closed"):
      return
    previous(unraisable)

  hook.drops_closed_loop_wakeups = True
  sys.unraisablehook = hook


def _check_tree(restored: Any, abstract: Any, name: str) -> None:
  got = jax.tree.map(lambda x: (tuple(np.shape(x)), str(x.dtype)), restored)
  want = jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), abstract)
  if jax.tree.structure(got) != jax.tree.structure(want) or got != want:
    raise ValueError(f"the saved {name} does not match this model's shapes")
