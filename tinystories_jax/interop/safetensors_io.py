"""safetensors read/write with numpy only (the format is an 8-byte header length, a JSON header
naming each tensor's dtype, shape and byte range, then the raw little-endian bytes).

Reading checks every tensor's byte range against the file, so a truncated or corrupt file fails
with one sentence instead of garbage weights.
"""

from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype("<i8"), "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"), "I8": np.dtype("i1"), "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}
_NAMES = {v: k for k, v in _DTYPES.items()}


class SafetensorsError(ValueError):
  """A safetensors file is truncated, corrupt or uses a dtype we do not read."""


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """All tensors of a .safetensors file as numpy arrays (memory-mapped, read-only)."""
  path = os.fspath(path)
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    head = f.read(8)
    if len(head) < 8:
      raise SafetensorsError(f"{path} is truncated: it is too short to hold a safetensors header.")
    (n,) = struct.unpack("<Q", head)
    if 8 + n > size:
      raise SafetensorsError(f"{path} is truncated or not a safetensors file: its header claims "
                             f"{n} bytes but the file has {size}.")
    try:
      header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError):
      raise SafetensorsError(f"{path} is corrupt: its header is not valid JSON.") from None
  if not isinstance(header, dict):
    raise SafetensorsError(f"{path} is corrupt: its header is not a JSON object.")
  header.pop("__metadata__", None)
  data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n) if size > 8 + n else np.zeros(
      0, np.uint8)
  out = {}
  for name, info in header.items():
    try:
      dtype = _DTYPES[info["dtype"]]
      shape = tuple(int(s) for s in info["shape"])
      begin, end = (int(x) for x in info["data_offsets"])
    except KeyError as e:
      raise SafetensorsError(f"{path}: tensor {name!r} has an unsupported dtype or a malformed "
                             f"entry ({e}).") from None
    if end > data.size or end - begin != int(np.prod(shape)) * dtype.itemsize or begin < 0:
      raise SafetensorsError(f"{path} is truncated or corrupt: tensor {name!r} needs bytes "
                             f"{begin}..{end} of {data.size} data bytes.")
    out[name] = data[begin:end].view(dtype).reshape(shape)
  return out


def write_safetensors(path: str | os.PathLike, tensors: dict[str, np.ndarray],
                      metadata: dict[str, str] | None = None) -> None:
  """Writes `tensors` (C-contiguous copies are made as needed) in safetensors layout."""
  header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
  offset = 0
  arrays = []
  for name in sorted(tensors):
    a = np.ascontiguousarray(tensors[name])
    if a.dtype not in _NAMES:
      raise SafetensorsError(f"cannot write tensor {name!r} of dtype {a.dtype} to safetensors.")
    header[name] = {"dtype": _NAMES[a.dtype], "shape": list(a.shape),
                    "data_offsets": [offset, offset + a.nbytes]}
    offset += a.nbytes
    arrays.append(a)
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # keep the data 8-byte aligned, as the reference writer does
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for a in arrays:
      f.write(a.tobytes())
