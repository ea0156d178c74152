"""The sample command: prompts files in, completions rows out; errors in one sentence."""

import io
import json
import os
import pathlib
import subprocess
import sys

import pytest

from tinystories_jax.sampling import SamplerError, command
from tinystories_jax.sampling.command import SampleRequest


def _request(workdir, **kw):
  base = dict(workdir=str(workdir), sampler=dict(max_new_tokens=6, seed=1), batch_size=4)
  base.update(kw)
  return SampleRequest(**base)


def test_prompts_file_writes_grading_rows_and_resumes(tiny_workdir, tmp_path):
  prompts = tmp_path / "prompts.jsonl"
  # Other fields are carried over, but never over what the command writes.
  prompts.write_text(json.dumps({"id": "a", "prompt": "Tom went", "set": "x",
                                 "completion": "a reference", "model": "someone"}) + "\n\n" +
                     json.dumps({"id": 7, "prompt": "Lily"}) + "\n")
  out = tmp_path / "out.jsonl"
  log = io.StringIO()
  assert command.run_sample(_request(tiny_workdir, prompts_file=str(prompts), output=str(out),
                                     num_samples=2), out=log) == 4
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  assert [r["id"] for r in rows] == ["a#0", "a#1", "7#0", "7#1"]
  assert [r["prompt_id"] for r in rows] == ["a", "a", 7, 7]  # as the prompts file wrote them
  assert rows[0]["set"] == "x" and "set" not in rows[2]
  assert rows[0]["model"] == f"{tiny_workdir}@7"
  assert rows[0]["completion"] != "a reference"
  assert rows[0]["sampler"]["max_new_tokens"] == 6 and rows[0]["sampler"]["seed"] == 1
  assert all(isinstance(r["completion"], str) and r["completion_tokens"] <= 6 for r in rows)
  assert rows[0]["completion"] != rows[1]["completion"]  # two samples, not one twice
  # A rerun after losing the last row writes just that row, and the same text again.
  lines = out.read_text().splitlines()
  out.write_text("\n".join(lines[:3]) + "\n")
  assert command.run_sample(_request(tiny_workdir, prompts_file=str(prompts), output=str(out),
                                     num_samples=2), out=log) == 1
  assert out.read_text().splitlines() == lines


def test_plain_text_prompts_take_line_numbers_as_ids(tiny_workdir, tmp_path):
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("Once upon a time\n\nTom had a dog\n")
  out = tmp_path / "out.jsonl"
  command.run_sample(_request(tiny_workdir, prompts_file=str(prompts), output=str(out)),
                     out=io.StringIO())
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  assert [(r["id"], r["prompt"]) for r in rows] == [("1", "Once upon a time"),
                                                     ("3", "Tom had a dog")]


def test_without_output_rows_go_to_stdout_and_ids_keep_their_type(tiny_workdir, tmp_path):
  prompts = tmp_path / "prompts.jsonl"
  prompts.write_text(json.dumps({"id": 7, "prompt": "Lily"}) + "\n")
  shown = io.StringIO()
  assert command.run_sample(_request(tiny_workdir, prompts_file=str(prompts)), out=shown) == 1
  [row] = [json.loads(line) for line in shown.getvalue().splitlines()]
  assert row["id"] == 7 and row["prompt_id"] == 7 and row["prompt"] == "Lily"


def test_a_plain_text_prompt_may_start_with_a_brace(tmp_path):
  path = tmp_path / "p.txt"
  path.write_text("{Lily} found a box\nTom ran\n")
  assert [(r.id, r.prompt) for r in command.read_prompts(str(path))] == [
      ("1", "{Lily} found a box"), ("2", "Tom ran")]
  path.write_text('{"id": 1, "prompt": "a"\n')  # meant as JSONL, broken
  with pytest.raises(SamplerError, match="line 1 is not valid JSON"):
    command.read_prompts(str(path))


def test_bfloat16_matmuls_are_recorded_in_the_rows(tiny_workdir, tmp_path):
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("Once upon a time\n")
  out = tmp_path / "out.jsonl"
  command.run_sample(_request(tiny_workdir, prompts_file=str(prompts), output=str(out),
                              matmul_dtype="bfloat16"), out=io.StringIO())
  [row] = [json.loads(line) for line in out.read_text().splitlines()]
  assert row["sampler"]["matmul_dtype"] == "bfloat16" and row["completion_tokens"] > 0


def test_a_single_prompt_streams_the_story(tiny_workdir, tmp_path):
  shown = io.StringIO()
  command.run_sample(_request(tiny_workdir, prompt="Once upon a time"), out=shown)
  out = tmp_path / "one.jsonl"
  command.run_sample(_request(tiny_workdir, prompt="Once upon a time", output=str(out)),
                     out=io.StringIO())
  [row] = [json.loads(line) for line in out.read_text().splitlines()]
  assert shown.getvalue() == "Once upon a time" + row["completion"] + "\n"


@pytest.mark.parametrize("kw, match", [
    (dict(), "exactly one of --prompt"),
    (dict(prompt="x", prompts_file="y"), "exactly one of --prompt"),
    (dict(prompts_file="/nonexistent/p.jsonl"), "does not exist"),
    (dict(prompt="x", num_samples=0), "--num_samples"),
    (dict(prompt="x", sampler=dict(top_p=2.0)), "top_p"),
    (dict(prompt="Tom " * 200), "too long"),
])
def test_mistakes_end_in_one_sentence(tiny_workdir, kw, match):
  with pytest.raises(SamplerError, match=match):
    command.run_sample(_request(tiny_workdir, **kw), out=io.StringIO())


def test_bad_prompts_files_name_the_line(tmp_path):
  path = tmp_path / "p.jsonl"
  path.write_text('{"id": 1, "prompt": "a"}\n{"id": 1, "prompt": "b"}\n')
  with pytest.raises(SamplerError, match="line 2 repeats id '1'"):
    command.read_prompts(str(path))
  path.write_text('{"id": 1, "prompt": "a"}\n{"id": 2}\n')
  with pytest.raises(SamplerError, match="line 2 has no 'prompt'"):
    command.read_prompts(str(path))
  path.write_text('{"id": 1, "prompt": "a"}\n{oops\n')
  with pytest.raises(SamplerError, match="line 2 is not valid JSON"):
    command.read_prompts(str(path))


def test_the_main_exits_with_one_error_line(tmp_path):
  root = pathlib.Path(__file__).resolve().parents[2]
  env = dict(os.environ, PYTHONPATH=str(root), JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, "-m", "tinystories_jax.sample",
                      f"--workdir={tmp_path / 'missing'}", "--prompt=Once"],
                     capture_output=True, text=True, env=env, timeout=300)
  assert r.returncode == 1
  assert r.stderr.strip().splitlines() == [
      f"error: workdir {tmp_path / 'missing'} does not exist; pass the --workdir of a training "
      "run or of `interop import-*`."]
  assert "Traceback" not in r.stderr
