"""Append-only JSONL results that survive a killed process (grades, generated stories).

Each result is written with one `os.write` on an O_APPEND descriptor the moment it exists, so a
SIGKILL leaves either the whole row or, at worst, one torn last line. Opening the journal again
cuts a torn tail off and reports the keys already present, which is how a restarted run skips
what is done and redoes what was lost, and nothing else.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from typing import Any


def content_key(*parts: Any) -> str:
  """A stable hex key for a result, from the JSON of everything that identifies it."""
  blob = json.dumps(parts, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
  return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:32]


def read_rows(path: str) -> Iterator[dict[str, Any]]:
  """The complete rows of a journal; a torn last line (no newline yet) is skipped."""
  if not os.path.exists(path):
    return
  with open(path, "rb") as f:
    for line_number, line in enumerate(f, 1):
      if not line.endswith(b"\n"):
        return
      if not line.strip():
        continue
      try:
        yield json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(
            f"{path} line {line_number} is not JSON ({e.msg}); move the file away or fix that "
            "line before resuming.") from None


class Journal:
  """An open append-only JSONL file of results keyed by `row[key_field]`.

  Args:
    path: the JSONL file; created if missing.
    key_field: the row field that identifies a result.
    keep_rows: hold every row in `rows` (small files); False keeps only the keys, for files
      of millions of rows that callers stream with `read_rows`.
    repair: cut a torn last line off. Only the process that opens the journal first may do
      this; processes that join it to write alongside pass False.
  """

  def __init__(self, path: str, key_field: str = "key", keep_rows: bool = True,
               repair: bool = True):
    self.path = path
    self.key_field = key_field
    self.keep_rows = keep_rows
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if repair:
      self._truncate_torn_tail()
    self.rows: list[dict[str, Any]] = []
    self.keys: set[str] = set()
    for row in read_rows(path):
      if key_field in row:
        self.keys.add(row[key_field])
      if keep_rows:
        self.rows.append(row)
    self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

  def _truncate_torn_tail(self) -> None:
    if not os.path.exists(self.path):
      return
    with open(self.path, "rb+") as f:
      f.seek(0, os.SEEK_END)
      size = f.tell()
      if size == 0:
        return
      # Walk back to the last newline; anything after it is a row cut short by a kill.
      block = 1 << 16
      end = size
      while end > 0:
        start = max(0, end - block)
        f.seek(start)
        chunk = f.read(end - start)
        cut = chunk.rfind(b"\n")
        if cut >= 0:
          keep = start + cut + 1
          if keep < size:
            f.truncate(keep)
          return
        end = start
      f.truncate(0)

  def append(self, row: dict[str, Any]) -> None:
    """Writes one row and hands it to the OS before returning (it survives a process kill)."""
    data = (json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")
    written = os.write(self._fd, data)
    while written < len(data):  # Regular files write fully; this only guards odd filesystems.
      written += os.write(self._fd, data[written:])
    if self.keep_rows:
      self.rows.append(row)
    if self.key_field in row:
      self.keys.add(row[self.key_field])

  def close(self) -> None:
    if self._fd >= 0:
      os.close(self._fd)
      self._fd = -1

  def __enter__(self) -> Journal:
    return self

  def __exit__(self, *exc) -> None:
    self.close()
