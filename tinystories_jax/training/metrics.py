"""Training metrics: one writer for the console, WORKDIR/metrics.jsonl and TensorBoard.

TensorBoard event files are written with tensorboardX, which needs no TensorFlow. Only process 0
writes. Model FLOP/s use the PaLM count (`models.config.count_flops_per_token`); MFU divides them
by a per-device peak looked up from the device kind (or `train.peak_flops`).
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any, Mapping

import jax
from absl import logging

# Dense bf16 peak FLOP/s per device (vendor figures, no sparsity). Matched as substrings of
# `jax.Device.device_kind`, first match wins, so more specific names come first.
PEAK_FLOPS = (
    ("H200", 989e12),
    ("H100", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("L4", 121e12),
    ("A10", 125e12),
    ("RTX 4090", 165e12),
    ("TPU v6", 918e12),
    ("TPU v5p", 459e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12),
    ("TPU v5", 459e12),
    ("TPU v4", 275e12),
    ("TPU v3", 123e12),
)


def peak_flops_per_device(device: jax.Device | None = None, override: float = 0.0) -> float | None:
  """The peak FLOP/s of one device, or None when unknown (CPUs, unlisted accelerators)."""
  if override > 0:
    return override
  device = device or jax.devices()[0]
  kind = getattr(device, "device_kind", "") or ""
  for name, peak in PEAK_FLOPS:
    if name.lower() in kind.lower():
      return peak
  return None


class _QuietLibraries:
  """Drops INFO lines from Orbax and Grain, which log every file they write or read."""

  def filter(self, record) -> bool:
    path = record.pathname.replace(os.sep, "/")
    return record.levelno >= 30 or not ("/orbax/" in path or "/grain/" in path)


def quiet_library_logs() -> None:
  """Keeps the console to the run's own lines (warnings from the libraries still show)."""
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _QuietLibraries) for f in handler.filters):
    handler.addFilter(_QuietLibraries())


def _scalar(v: Any) -> Any:
  if isinstance(v, bool):
    return v
  try:
    f = float(v)
  except (TypeError, ValueError):
    return v
  if isinstance(v, int) or (hasattr(v, "dtype") and "int" in str(getattr(v, "dtype"))):
    return int(f)
  return f


def _format(v: Any) -> str:
  if isinstance(v, float):
    if v == 0 or math.isnan(v) or math.isinf(v):
      return str(v)
    return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
  return str(v)


class MetricWriter:
  """Appends a dict of scalars per step to the console, metrics.jsonl and TensorBoard."""

  def __init__(self, workdir: str, *, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._jsonl = None
    self._tb = None
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", buffering=1)
    # Imported lazily: tensorboardX pulls in protobuf, which only the writing process needs.
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, metrics: Mapping[str, Any], *, console: bool = True) -> dict:
    """Records `metrics` for `step`; returns the row written."""
    row = {"step": int(step)}
    row.update({k: _scalar(v) for k, v in metrics.items()})
    if not self.enabled:
      return row
    self._jsonl.write(json.dumps(row) + "\n")
    for k, v in row.items():
      if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
        self._tb.add_scalar(k, v, step)
    if console:
      logging.info("step %d: %s", step,
                   ", ".join(f"{k}={_format(v)}" for k, v in row.items() if k != "step"))
    return row

  def flush(self) -> None:
    if self.enabled:
      self._jsonl.flush()
      self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()


class Progress:
  """A tqdm bar over the run's steps, shown only when stderr is a terminal."""

  def __init__(self, total: int, initial: int, enabled: bool):
    self._bar = None
    if enabled and jax.process_index() == 0 and sys.stderr.isatty():
      from tqdm import tqdm  # pylint: disable=g-import-not-at-top
      self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

  def update(self, n: int = 1, **postfix: Any) -> None:
    if self._bar is not None:
      if postfix:
        self._bar.set_postfix({k: _format(_scalar(v)) for k, v in postfix.items()}, refresh=False)
      self._bar.update(n)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
