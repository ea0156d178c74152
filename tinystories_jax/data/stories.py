"""Reading raw story corpora in every layout TinyStories ships in.

Accepted inputs, by path, glob or directory, in any mix:

* the original ``.txt`` files, stories separated by a line ``<|endoftext|>``
  (``TinyStories-train.txt``, ``TinyStoriesV2-GPT4-train.txt``, the Instruct files);
* ``.jsonl`` with a ``text`` or ``story`` field on each line (also this project's generator output);
* ``.json`` holding a list of objects with a ``story`` (or ``text``) field, as inside
  ``TinyStories_all_data.tar.gz``, and that tarball (or any ``.tar``/``.tgz``) itself;
* gzip of any of these (``.txt.gz``, ``.jsonl.gz``, ``.json.gz``);
* opt-in, files on the Hugging Face hub: ``hf://roneneldan/TinyStories/TinyStories-valid.txt``,
  downloaded once into the hub cache. Nothing here touches the network unless such a source is named.

This module imports neither jax nor numpy, so the grading and generation tools can use it.
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import json
import os
import pathlib
import tarfile
import zlib
from collections.abc import Iterable, Iterator, Sequence
from typing import BinaryIO

from tinystories_jax.data.errors import DataError

END_OF_TEXT = "<|endoftext|>"
HUB_PREFIX = "hf://"
_PLAIN_KINDS = {".txt": "txt", ".jsonl": "jsonl", ".json": "json"}
_TAR_SUFFIXES = (".tar.gz", ".tgz", ".tar")
SUPPORTED = (".txt", ".jsonl", ".json", ".txt.gz", ".jsonl.gz", ".json.gz", ".tar.gz", ".tgz", ".tar")
_TEXT_FIELDS = ("text", "story")


@dataclasses.dataclass(frozen=True)
class Story:
  """One raw story and where it came from (``file:line`` or ``file[index]``)."""

  text: str
  where: str


def split_specs(specs: str | Sequence[str]) -> list[str]:
  """Splits a comma-separated flag value (or a list of them) into single specs."""
  if isinstance(specs, str):
    specs = [specs]
  out = []
  for spec in specs:
    out.extend(s.strip() for s in spec.split(",") if s.strip())
  return out


def _kind(name: str) -> str | None:
  lower = name.lower()
  if lower.endswith(_TAR_SUFFIXES):
    return "tar"
  if lower.endswith(".gz"):
    lower = lower[:-3]
  for suffix, kind in _PLAIN_KINDS.items():
    if lower.endswith(suffix):
      return kind
  return None


def _download_from_hub(spec: str) -> pathlib.Path:
  """Fetches ``hf://owner/repo/path/in/repo`` into the hub cache (a dataset repository)."""
  rest = spec[len(HUB_PREFIX):]
  parts = rest.split("/")
  if len(parts) < 3 or not all(parts):
    raise DataError(
        f"{spec!r} is not a hub file: write hf://OWNER/REPO/FILE, "
        "e.g. hf://roneneldan/TinyStories/TinyStories-valid.txt.")
  repo_id, filename = "/".join(parts[:2]), "/".join(parts[2:])
  try:
    import huggingface_hub  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise DataError(
        f"reading {spec} needs the huggingface_hub package: "
        "pip install 'tinystories-jax[hf]'.") from e
  try:
    path = huggingface_hub.hf_hub_download(repo_id=repo_id, filename=filename, repo_type="dataset")
  except Exception as e:  # The hub client raises many types; all mean "could not get it".
    raise DataError(
        f"could not fetch {filename} from the hub dataset {repo_id} ({type(e).__name__}: "
        f"{str(e).splitlines()[0] if str(e) else 'no detail'}): check the name, the network, "
        "or download the file yourself and pass its local path.") from e
  return pathlib.Path(path)


def resolve(specs: str | Sequence[str]) -> list[pathlib.Path]:
  """Turns paths, globs, directories and hub specs into a sorted, de-duplicated list of files.

  Args:
    specs: a comma-separated string or a list of them.

  Returns:
    Local file paths, in the order given (directories and globs expand sorted).

  Raises:
    DataError: a path that does not exist, a glob or directory with no story files, or a file
      whose format is unknown.
  """
  files: list[pathlib.Path] = []
  for spec in split_specs(specs):
    if spec.startswith(HUB_PREFIX):
      files.append(_download_from_hub(spec))
      continue
    expanded = os.path.expanduser(spec)
    if any(c in expanded for c in "*?["):
      matches = sorted(glob.glob(expanded, recursive=True))
      found = [pathlib.Path(m) for m in matches if os.path.isfile(m) and _kind(m)]
      if not found:
        raise DataError(f"the pattern {spec!r} matches no story files ({', '.join(SUPPORTED)}): "
                        "check the pattern.")
      files.extend(found)
      continue
    path = pathlib.Path(expanded)
    if path.is_dir():
      found = sorted(p for p in path.rglob("*") if p.is_file() and _kind(p.name))
      if not found:
        raise DataError(f"the directory {spec} holds no story files ({', '.join(SUPPORTED)}): "
                        "point --input at the files themselves.")
      files.extend(found)
    elif path.is_file():
      if _kind(path.name) is None:
        raise DataError(f"{spec}: unknown format; story files end in {', '.join(SUPPORTED)} "
                        "(rename the file if its content is one of these).")
      files.append(path)
    elif path.exists():
      raise DataError(f"{spec} is neither a file nor a directory: pass story files.")
    else:
      raise DataError(f"input {spec} does not exist: check the path.")
  if not files:
    raise DataError("no input files were given: pass --input=PATH (files, globs or directories).")
  seen, unique = set(), []
  for f in files:
    key = f.resolve()
    if key not in seen:
      seen.add(key)
      unique.append(f)
  return unique


def _text_of(obj, where: str) -> str | None:
  if isinstance(obj, str):
    return obj
  if not isinstance(obj, dict):
    raise DataError(f"{where}: expected a JSON object with a 'text' or 'story' field, "
                    f"found {type(obj).__name__}: fix or remove that record.")
  for field in _TEXT_FIELDS:
    value = obj.get(field)
    if isinstance(value, str):
      return value
  raise DataError(f"{where}: the record has no string 'text' or 'story' field "
                  f"(its keys: {', '.join(sorted(obj)) or 'none'}): fix or remove that record.")


def _decode(raw: bytes, where: str) -> str:
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise DataError(f"{where} is not UTF-8 text ({e.reason} at byte {e.start}): "
                    "convert the file to UTF-8.") from e


def _read_txt(stream: BinaryIO, name: str) -> Iterator[Story]:
  lines: list[str] = []
  start = 1
  for lineno, raw in enumerate(stream, 1):
    line = _decode(raw, f"{name}:{lineno}")
    if line.strip() == END_OF_TEXT:
      if lines:
        yield Story("".join(lines), f"{name}:{start}")
      lines, start = [], lineno + 1
    else:
      lines.append(line)
  if any(line.strip() for line in lines):
    yield Story("".join(lines), f"{name}:{start}")


def _read_jsonl(stream: BinaryIO, name: str) -> Iterator[Story]:
  for lineno, raw in enumerate(stream, 1):
    line = _decode(raw, f"{name}:{lineno}").strip()
    if not line:
      continue
    where = f"{name}:{lineno}"
    try:
      obj = json.loads(line)
    except json.JSONDecodeError as e:
      raise DataError(f"{where}: malformed JSON ({e.msg} at column {e.colno}): "
                      "fix or remove that line.") from e
    yield Story(_text_of(obj, where), where)


def _read_json(stream: BinaryIO, name: str) -> Iterator[Story]:
  try:
    data = json.loads(_decode(stream.read(), name))
  except json.JSONDecodeError as e:
    raise DataError(f"{name}: malformed JSON ({e.msg} at line {e.lineno} column {e.colno}): "
                    "fix the file or re-download it.") from e
  if isinstance(data, dict):
    data = [data]
  if not isinstance(data, list):
    raise DataError(f"{name}: expected a JSON list of story objects: use .jsonl for one story a line.")
  for i, obj in enumerate(data):
    yield Story(_text_of(obj, f"{name}[{i}]"), f"{name}[{i}]")


_READERS = {"txt": _read_txt, "jsonl": _read_jsonl, "json": _read_json}


def _read_stream(stream: BinaryIO, name: str) -> Iterator[Story]:
  kind = _kind(name)
  if name.lower().endswith(".gz") and kind != "tar":
    stream = gzip.GzipFile(fileobj=stream, mode="rb")
  yield from _READERS[kind](stream, name)


def _read_tar(path: pathlib.Path) -> Iterator[Story]:
  with tarfile.open(path, mode="r:*") as tar:
    for member in tar:
      if not member.isfile():
        continue
      kind = _kind(member.name)
      if kind is None or kind == "tar":
        continue
      handle = tar.extractfile(member)
      if handle is None:
        continue
      with handle:
        yield from _read_stream(handle, f"{path.name}/{member.name}")


def read_file(path: str | os.PathLike[str]) -> Iterator[Story]:
  """Yields the stories of one file, raising DataError for unreadable or corrupt input."""
  path = pathlib.Path(path)
  kind = _kind(path.name)
  if kind is None:
    raise DataError(f"{path}: unknown format; story files end in {', '.join(SUPPORTED)}.")
  try:
    if kind == "tar":
      yield from _read_tar(path)
    else:
      with open(path, "rb") as f:
        yield from _read_stream(f, str(path))
  except PermissionError as e:
    raise DataError(f"cannot read {path} (permission denied): fix its permissions.") from e
  except (gzip.BadGzipFile, EOFError, zlib.error) as e:
    raise DataError(f"{path} is not a valid or complete gzip file ({e}): re-download or "
                    "re-compress it.") from e
  except tarfile.TarError as e:
    raise DataError(f"{path} is not a valid or complete tar archive ({e}): re-download it.") from e
  except IsADirectoryError as e:
    raise DataError(f"{path} is a directory: pass it as a directory input instead.") from e
  except OSError as e:
    raise DataError(f"cannot read {path} ({e.strerror or e}): check the file.") from e


def iter_stories(paths: Iterable[str | os.PathLike[str]]) -> Iterator[Story]:
  """Yields every story of every file, in order."""
  for path in paths:
    yield from read_file(path)
