"""The `sample` command: prompts in, stories to the terminal or to a completions file.

A prompts file is JSONL with `id` and `prompt` per line (other fields are copied to the output),
or plain text with one prompt a line (ids are line numbers). Output rows are
`{"id", "prompt", "completion", "model", "sampler", ...}`, the format `grade` reads; each batch is
appended as soon as it is done, and rerunning with the same --output skips the rows already there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
from typing import Any, TextIO

from tinystories_jax.sampling import workdir as workdir_lib
from tinystories_jax.sampling.config import SamplerConfig, SamplerError
from tinystories_jax.sampling.text import StoryWriter


@dataclasses.dataclass
class PromptRow:
  """One prompt to continue: its id (as text, and as the file wrote it), text, and the file's
  other fields."""
  id: str
  prompt: str
  extra: dict[str, Any]
  raw_id: Any = None

  @property
  def out_id(self) -> Any:
    """The id as the prompts file wrote it (a number stays a number), else the text form."""
    return self.id if self.raw_id is None else self.raw_id


@dataclasses.dataclass
class SampleRequest:
  """What the command was asked to do (flags, already parsed)."""
  workdir: str
  prompt: str | None = None
  prompts_file: str | None = None
  output: str | None = None
  num_samples: int = 1
  batch_size: int = 32
  step: int | None = None
  dtype: str = "auto"
  matmul_dtype: str | None = None  # Sampler(matmul_dtype=...)
  sampler: dict[str, Any] = dataclasses.field(default_factory=dict)  # SamplerConfig fields


def read_prompts(path: str) -> list[PromptRow]:
  """Reads a prompts file (JSONL with id and prompt, or one plain-text prompt a line).

  Raises:
    SamplerError: a missing file, a JSONL line without a prompt, a repeated id, or no prompts.
  """
  if not os.path.isfile(path):
    raise SamplerError(f"prompts file {path} does not exist; check --prompts_file.")
  with open(path, encoding="utf-8") as f:
    lines = [(n, line.rstrip("\n")) for n, line in enumerate(f, 1) if line.strip()]
  if not lines:
    raise SamplerError(f"prompts file {path} holds no prompts; write one prompt a line.")
  rows, seen = [], set()
  # JSONL when the first line is a JSON object, or was meant to be one ('{"'); a plain-text
  # prompt may itself start with a brace ("{Lily} found a box").
  first = lines[0][1].strip()
  as_json = first.startswith('{"')
  if first.startswith("{") and not as_json:
    try:
      as_json = isinstance(json.loads(first), dict)
    except json.JSONDecodeError:
      as_json = False
  for n, line in lines:
    where = f"{path} line {n}"
    if not as_json:
      rows.append(PromptRow(str(n), line, {}))
      continue
    try:
      obj = json.loads(line)
    except json.JSONDecodeError as e:
      raise SamplerError(f"{where} is not valid JSON ({e.msg}); a JSONL prompts file needs one "
                         "JSON object a line.") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
      raise SamplerError(f"{where} has no 'prompt' string; write rows like "
                         '{"id": "1", "prompt": "Once upon a time"}.')
    row_id = str(obj["id"]) if obj.get("id") is not None else str(n)
    if row_id in seen:
      raise SamplerError(f"{where} repeats id {row_id!r}; ids must be unique.")
    seen.add(row_id)
    extra = {k: v for k, v in obj.items() if k not in ("id", "prompt")}
    rows.append(PromptRow(row_id, obj["prompt"], extra, obj.get("id")))
  return rows


def _done_ids(path: str) -> set[str]:
  """Ids already written to an output file (a rerun skips them)."""
  if not os.path.isfile(path):
    return set()
  ids = set()
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        ids.add(str(json.loads(line)["id"]))
      except (json.JSONDecodeError, KeyError, TypeError):
        raise SamplerError(f"{path} line {n} is not a completion row; move the file away or "
                           "choose another --output.") from None
  return ids


def sampler_config(settings: dict[str, Any], longest_prompt: int, max_positions: int
                   ) -> SamplerConfig:
  """The SamplerConfig for `settings`; an unset max_new_tokens fills what the model has left."""
  settings = {k: v for k, v in settings.items() if v is not None}
  if "max_new_tokens" not in settings:
    default = SamplerConfig.__dataclass_fields__["max_new_tokens"].default
    settings["max_new_tokens"] = max(1, min(default, max_positions - longest_prompt))
  return SamplerConfig(**settings)


def run_sample(req: SampleRequest, out: TextIO = sys.stdout) -> int:
  """Runs the command; returns the number of completions written or printed.

  Raises:
    SamplerError: bad flags, workdir, prompts or settings (one sentence naming the fix).
  """
  if (req.prompt is None) == (req.prompts_file is None):
    raise SamplerError("pass exactly one of --prompt=TEXT or --prompts_file=FILE.")
  if req.num_samples < 1:
    raise SamplerError(f"--num_samples must be at least 1, got {req.num_samples}.")
  if req.batch_size < 1:
    raise SamplerError(f"--batch_size must be at least 1, got {req.batch_size}.")
  rows = ([PromptRow("1", req.prompt, {})] if req.prompt is not None
          else read_prompts(req.prompts_file))
  SamplerConfig(**{k: v for k, v in req.sampler.items() if v is not None})  # fail before loading
  loaded = workdir_lib.load(req.workdir, step=req.step, dtype=req.dtype)
  writer = StoryWriter(loaded, matmul_dtype=req.matmul_dtype)
  encoded = [writer.encode_prompt(r.prompt) for r in rows]
  config = sampler_config(req.sampler, max(len(e) for e in encoded), loaded.cfg.max_positions)
  too_long = [r.id for r, e in zip(rows, encoded)
              if len(e) > writer.max_prompt_tokens(config.max_new_tokens)]
  if too_long:
    raise SamplerError(
        f"prompt {too_long[0]} is too long: with --max_new_tokens={config.max_new_tokens} the "
        f"model's {loaded.cfg.max_positions} positions leave room for "
        f"{writer.max_prompt_tokens(config.max_new_tokens)} prompt tokens; shorten it or lower "
        "--max_new_tokens.")
  if req.output is None and req.prompts_file is None:
    return _to_terminal(writer, rows, encoded, config, req, out)
  return _to_file(writer, rows, encoded, config, req, loaded.name, out)


def _jobs(rows, num_samples):
  """(prompt index, sample index, output id) for every completion to write."""
  for i, row in enumerate(rows):
    for k in range(num_samples):
      yield i, k, row.id if num_samples == 1 else f"{row.id}#{k}"


def _to_file(writer, rows, encoded, config, req, model_name, out) -> int:
  """Writes completion rows to --output (skipping ids already there), or as JSONL to `out`
  when there is no --output (progress then goes to stderr)."""
  to_out = req.output is None
  done = set() if to_out else _done_ids(req.output)
  jobs = [j for j in _jobs(rows, req.num_samples) if j[2] not in done]
  total = len(rows) * req.num_samples
  progress = sys.stderr if to_out else out
  if done:
    print(f"{req.output} already holds {total - len(jobs)} of {total} rows; writing the rest.",
          file=out)
  sampler = config.to_dict()
  if req.matmul_dtype:
    sampler["matmul_dtype"] = req.matmul_dtype
  written = 0
  with contextlib.nullcontext(out) if to_out else open(req.output, "a", encoding="utf-8") as f:
    for start in range(0, len(jobs), req.batch_size):
      batch = jobs[start:start + req.batch_size]
      stories = writer.complete(
          [rows[i].prompt for i, _, _ in batch], config,
          encoded=[encoded[i] for i, _, _ in batch],
          streams=[i * req.num_samples + k for i, k, _ in batch])
      for (i, k, out_id), [story] in zip(batch, stories):
        # The file's other fields first: what this command writes may not be overridden by
        # them (a prompts file carrying a reference "completion", say).
        row = {**rows[i].extra,
               "id": rows[i].out_id if req.num_samples == 1 else out_id,
               "prompt": rows[i].prompt, "completion": story.text,
               "model": model_name, "sampler": sampler, "prompt_id": rows[i].out_id,
               "sample": k, "finish_reason": story.finish_reason,
               "completion_tokens": story.completion_tokens}
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
      f.flush()
      written += len(batch)
      print(f"{len(done) + written}/{total} completions "
            f"{'written' if to_out else 'in ' + req.output}", file=progress, flush=True)
  return written


def _to_terminal(writer, rows, encoded, config, req, out) -> int:
  row = rows[0]
  if req.num_samples == 1 and config.num_beams == 1:
    out.write(row.prompt)
    out.flush()

    def show(pieces):
      out.write(pieces[0])
      out.flush()

    writer.complete([row.prompt], config, encoded=encoded, streams=[0], on_text=show)
    out.write("\n")
    return 1
  count = 0
  for start in range(0, req.num_samples, req.batch_size):
    ks = list(range(start, min(start + req.batch_size, req.num_samples)))
    stories = writer.complete([row.prompt] * len(ks), config, encoded=encoded * len(ks),
                              streams=ks)
    for k, [story] in zip(ks, stories):
      out.write(f"--- story {k + 1} of {req.num_samples} ---\n{row.prompt}{story.text}\n\n")
      out.flush()
      count += 1
  return count
