"""`python -m tinystories_jax.grade` end to end against the misbehaving loopback server."""

import collections
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tinystories_jax.grading import evalsets

from .conftest import REPO_ROOT, read_rows, run_grade, story_rows, write_jsonl

FAST = ["--backoff=0.01", "--max_retries=3", "--timeout=2", "--concurrency=8"]


def test_every_item_ends_graded_or_failed_with_its_reason(server, fake, tmp_path):
  fake.slow_s = 5.0
  markers = ["[prose]", "[429]", "[500]", "[slow]", "[truncated]", "[range]", "[down]",
             "[score=3]"]
  rows = story_rows(20, markers=markers)
  probes = evalsets.load_eval_set("reasoning")[:2]
  rows += [{"id": p["id"], "prompt": p["prompt"], "completion": f" {p['answers'][0]} now.",
            "model": "model-a"} for p in probes]
  path = write_jsonl(tmp_path / "c.jsonl", rows)
  out = tmp_path / "out"
  result = run_grade([f"--completions={path}", f"--output_dir={out}",
                      f"--base_url={server.base_url}", *FAST])
  assert result.returncode == 0, result.stderr
  grades = {r["id"]: r for r in read_rows(out / "grades.jsonl")}
  assert len(grades) == len(rows)
  by_marker = {m: grades[rows[i]["id"]] for i, m in enumerate(markers)}
  for marker in ["[prose]", "[429]", "[500]", "[slow]", "[truncated]"]:
    row = by_marker[marker]
    assert row["status"] == "ok", (marker, row["error"])
    assert set(row["scores"]) == {"grammar", "creativity", "consistency", "plot"}
    assert row["age_group"] == "C"
  assert by_marker["[score=3]"]["scores"]["grammar"] == 3
  assert by_marker["[truncated]"]["raw_answers"][1]["text"].startswith('{"grammar"')
  assert by_marker["[range]"]["status"] == "failed"
  assert "outside 1-10" in by_marker["[range]"]["error"]
  assert by_marker["[down]"]["status"] == "failed"
  assert "HTTP 500" in by_marker["[down]"]["error"]
  for probe in probes:
    assert grades[probe["id"]]["kind"] == "probe"
    assert grades[probe["id"]]["check"]["correct"] is True
  for row in grades.values():
    assert row["rubric_version"] == "1" and row["grader_model"] == "gpt-4o"
    assert "error" in row and "usage" in row
  summary = json.loads((out / "summary.json").read_text())
  assert summary["failed"] == 2 and summary["graded"] == 18 and summary["items"] == 22
  model = summary["models"]["model-a"]
  assert model["probes"]["reasoning"] == {"correct": 2, "total": 2, "accuracy": 1.0}
  assert model["usage"]["prompt_tokens"] > 0
  grammar = model["scores"]["grammar"]
  assert grammar["ci95"][0] <= grammar["mean"] <= grammar["ci95"][1]
  report = (out / "report.md").read_text()
  assert "model-a" in report and "***" in report and "outside 1-10" in report
  assert (out / "scores.png").stat().st_size > 0 and (out / "age_groups.png").exists()
  assert "2 failed" in result.stdout


def test_side_by_side_models_and_reference_ceiling(server, fake, tmp_path):
  del fake
  a = write_jsonl(tmp_path / "a.jsonl", story_rows(6, model="small"))
  b = write_jsonl(tmp_path / "b.jsonl", story_rows(6, model="big", markers=["[score=9]"] * 6))
  stories = write_jsonl(tmp_path / "stories.jsonl", [
      {"text": f"Sam had a dog number {i}. The dog liked to run in the big green park every "
               "day. One day the dog found a ball and gave it to Sam."} for i in range(10)])
  out = tmp_path / "out"
  result = run_grade([f"--completions={a},{b}", f"--output_dir={out}",
                      f"--base_url={server.base_url}", f"--reference_stories={stories}",
                      "--reference_count=4", *FAST])
  assert result.returncode == 0, result.stderr
  summary = json.loads((out / "summary.json").read_text())
  assert set(summary["models"]) == {"small", "big", "reference"}
  assert summary["models"]["reference"]["graded"] == 4
  assert summary["models"]["big"]["scores"]["grammar"]["mean"] == 9
  assert summary["models"]["small"]["scores"]["grammar"]["mean"] == 7
  first = summary["per_prompt"][0]
  assert first["prompt_id"] == "story-001"
  assert first["models"]["big"]["grammar"] == 9 and first["models"]["small"]["grammar"] == 7
  assert len(summary["per_prompt"]) == 6
  report = (out / "report.md").read_text()
  assert "| big |" in report and "| reference |" in report


def test_structured_output_fallback_end_to_end(server, fake, tmp_path):
  fake.structured_output = False
  path = write_jsonl(tmp_path / "c.jsonl", story_rows(4, markers=["[prose]"]))
  out = tmp_path / "out"
  result = run_grade([f"--completions={path}", f"--output_dir={out}",
                      f"--base_url={server.base_url}", *FAST])
  assert result.returncode == 0, result.stderr
  assert all(r["status"] == "ok" for r in read_rows(out / "grades.jsonl"))


def test_bad_input_is_one_clear_line_and_sends_nothing(server, fake, tmp_path):
  path = write_jsonl(tmp_path / "c.jsonl", story_rows(3) + [{"id": "x", "prompt": "p"}])
  result = run_grade([f"--completions={path}", f"--output_dir={tmp_path / 'out'}",
                      f"--base_url={server.base_url}"])
  assert result.returncode != 0
  assert "Traceback" not in result.stderr
  assert "line 4 has no 'completion' field" in result.stderr
  assert fake.stats["requests"] == 0


def test_missing_key_is_a_clear_error(tmp_path):
  path = write_jsonl(tmp_path / "c.jsonl", story_rows(1))
  result = run_grade([f"--completions={path}", f"--output_dir={tmp_path / 'out'}"])
  assert result.returncode != 0 and "Traceback" not in result.stderr
  assert "set the OPENAI_API_KEY environment variable" in result.stderr


def test_401_stops_the_run_and_never_leaks_the_key(server, fake, tmp_path):
  fake.api_key = "the-right-key"
  secret = "sk-test-DO-NOT-LEAK-42"
  path = write_jsonl(tmp_path / "c.jsonl", story_rows(30))
  out = tmp_path / "out"
  result = run_grade([f"--completions={path}", f"--output_dir={out}",
                      f"--base_url={server.base_url}", *FAST, "--concurrency=4"],
                     env={"OPENAI_API_KEY": secret})
  assert result.returncode != 0 and "Traceback" not in result.stderr
  assert "refused our credentials" in result.stderr
  assert fake.stats["status_401"] <= 3 + 4
  assert secret not in result.stderr + result.stdout
  # Nothing is marked failed: the items were never graded and a rerun with a good key will.
  assert not [r for r in read_rows(out / "grades.jsonl") if r["status"] == "failed"]
  for name in os.listdir(out):
    assert secret not in (out / name).read_text(errors="ignore")


def test_killed_run_resumes_without_repeats_or_losses(server, fake, tmp_path):
  fake.latency_s = 0.03
  rows = story_rows(200, markers=["[down]"] * 3)
  path = write_jsonl(tmp_path / "c.jsonl", rows)
  out = tmp_path / "out"
  grades = out / "grades.jsonl"
  args = [sys.executable, "-m", "tinystories_jax.grade", "--progress=false",
          f"--completions={path}", f"--output_dir={out}", f"--base_url={server.base_url}",
          *FAST]
  env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
  process = subprocess.Popen(args, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
  deadline = time.monotonic() + 60
  while time.monotonic() < deadline:
    if grades.exists() and grades.read_bytes().count(b"\n") >= 40:
      break
    time.sleep(0.02)
  process.send_signal(signal.SIGKILL)
  process.wait()
  done_before = grades.read_bytes().count(b"\n")
  assert 40 <= done_before < len(rows), "the kill must land mid-run"
  result = run_grade(args[4:], env=env)
  assert result.returncode == 0, result.stderr
  written = read_rows(grades)
  counts = collections.Counter(r["id"] for r in written)
  assert set(counts) == {r["id"] for r in rows}
  assert max(counts.values()) == 1
  assert sum(r["status"] == "failed" for r in written) == 3
  summary = json.loads((out / "summary.json").read_text())
  assert summary["graded"] == 197 and summary["failed"] == 3
  # A third run has nothing left to do and sends nothing.
  before = fake.stats["requests"]
  assert run_grade(args[4:], env=env).returncode == 0
  assert fake.stats["requests"] == before
  assert len(read_rows(grades)) == len(rows)


def test_retry_failed_grades_failures_again(server, fake, tmp_path):
  path = write_jsonl(tmp_path / "c.jsonl", story_rows(3))
  out = tmp_path / "out"
  fake.chat_handler = lambda body, attempt: __import__("openai_server").Reply(status=500)
  assert run_grade([f"--completions={path}", f"--output_dir={out}",
                    f"--base_url={server.base_url}", *FAST]).returncode == 0
  assert json.loads((out / "summary.json").read_text())["failed"] == 3
  fake.chat_handler = None
  assert run_grade([f"--completions={path}", f"--output_dir={out}",
                    f"--base_url={server.base_url}", *FAST, "--retry_failed"]).returncode == 0
  summary = json.loads((out / "summary.json").read_text())
  assert summary["failed"] == 0 and summary["graded"] == 3


def test_grading_never_imports_jax():
  code = ("import sys, tinystories_jax.grading.grader, tinystories_jax.grading.report, "
          "tinystories_jax.grade; import tinystories_jax.grading as g; "
          "import pkgutil, importlib; "
          "[importlib.import_module('tinystories_jax.grading.' + m.name) "
          " for m in pkgutil.iter_modules(g.__path__)]; "
          "bad = [m for m in sys.modules "
          "       if m == 'jax' or m.startswith(('jax.', 'jaxlib', 'flax'))]; "
          "print(bad); sys.exit(1 if bad else 0)")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=REPO_ROOT)
  assert result.returncode == 0, result.stdout + result.stderr


def test_eval_script_grades_existing_completions(server, fake, tmp_path):
  del fake
  out = tmp_path / "eval"
  out.mkdir()
  # One completion per prompt already there: the script goes straight to grading.
  prompts = [row for name in evalsets.SETS_FOR_RUBRIC["story"]
             for row in evalsets.load_eval_set(name)]
  write_jsonl(out / "completions.jsonl", [
      {"id": p["id"], "prompt": p["prompt"], "completion": " the box and smiled. [score=8]",
       "model": "runs/x@step10", "sampler": {}} for p in prompts])
  env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
  env.update(PYTHON=sys.executable, BASE_URL=server.base_url, GRADE_FLAGS="--progress=false")
  result = subprocess.run(["bash", os.path.join(REPO_ROOT, "launch", "eval.sh"),
                           str(tmp_path / "workdir"), str(out)],
                          capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=120)
  assert result.returncode == 0, result.stderr
  assert (out / "prompts.jsonl").exists()
  summary = json.loads((out / "grades" / "summary.json").read_text())
  model = summary["models"]["runs/x@step10"]
  assert model["graded"] == len(evalsets.load_eval_set("stories"))
  assert model["probes"]["context"]["total"] == len(evalsets.load_eval_set("context"))
  assert model["scores"]["grammar"]["mean"] == 8


def test_eval_script_passes_shellcheck():
  shellcheck = shutil.which("shellcheck")
  if shellcheck is None:
    pytest.skip("shellcheck is not installed (it comes with the [test] extra)")
  result = subprocess.run([shellcheck, os.path.join(REPO_ROOT, "launch", "eval.sh")],
                          capture_output=True, text=True)
  assert result.returncode == 0, result.stdout


def test_workers_share_the_items_and_resume_after_a_kill(server, fake, tmp_path):
  fake.latency_s = 0.03
  rows = story_rows(240, markers=["[prose]", "[500]", "[down]"])
  path = write_jsonl(tmp_path / "c.jsonl", rows)
  out = tmp_path / "out"
  grades = out / "grades.jsonl"
  args = [sys.executable, "-m", "tinystories_jax.grade", "--progress=false",
          f"--completions={path}", f"--output_dir={out}", f"--base_url={server.base_url}",
          "--workers=2", *FAST]
  env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
  process = subprocess.Popen(args, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
  deadline = time.monotonic() + 90
  while time.monotonic() < deadline:
    if grades.exists() and grades.read_bytes().count(b"\n") >= 40:
      break
    time.sleep(0.02)
  process.send_signal(signal.SIGKILL)
  process.wait()
  time.sleep(1.0)  # The orphaned workers notice within 0.1 s and stop writing.
  settled = grades.read_bytes().count(b"\n")
  time.sleep(0.5)
  assert grades.read_bytes().count(b"\n") == settled, "workers kept writing after the kill"
  assert 40 <= settled < len(rows), "the kill must land mid-run"
  result = run_grade(args[4:], env=env)
  assert result.returncode == 0, result.stderr
  written = read_rows(grades)
  counts = collections.Counter(r["id"] for r in written)
  assert set(counts) == {r["id"] for r in rows} and max(counts.values()) == 1
  assert fake.stats["max_in_flight"] <= 8
  by_id = {r["id"]: r for r in written}
  assert by_id[rows[0]["id"]]["status"] == "ok" and by_id[rows[1]["id"]]["status"] == "ok"
  assert by_id[rows[2]["id"]]["status"] == "failed"


def test_workers_stop_on_refused_credentials(server, fake, tmp_path):
  fake.api_key = "right"
  path = write_jsonl(tmp_path / "c.jsonl", story_rows(20))
  result = run_grade([f"--completions={path}", f"--output_dir={tmp_path / 'out'}",
                      f"--base_url={server.base_url}", "--workers=2", *FAST],
                     env={"OPENAI_API_KEY": "sk-wrong"})
  assert result.returncode != 0 and "Traceback" not in result.stderr
  assert "refused our credentials" in result.stderr
  assert fake.stats["status_401"] <= 2 * (3 + 4)


def test_unreachable_endpoint_stops_without_marking_items_failed(tmp_path):
  path = write_jsonl(tmp_path / "c.jsonl", story_rows(40))
  out = tmp_path / "out"
  result = run_grade([f"--completions={path}", f"--output_dir={out}",
                      "--base_url=http://127.0.0.1:9/v1", "--backoff=0.01"])
  assert result.returncode != 0 and "Traceback" not in result.stderr
  assert "check that the server is running" in result.stderr
  assert not read_rows(out / "grades.jsonl")
