"""The Batch API runner and `grade --mode=batch` against the loopback /v1/files + /v1/batches."""

import collections
import json

import pytest

from openai_server import Reply
from tinystories_jax.grading.batch import BatchConfig, BatchRunner
from tinystories_jax.grading.client import AuthStop, ClientConfig, UnusableAnswer

from .conftest import read_rows, run_grade, story_rows, write_jsonl


def make_runner(server, tmp_path, **overrides):
  settings = dict(poll_interval_s=0.01, max_rounds=3)
  settings.update(overrides)
  return BatchRunner(ClientConfig(model="grader", base_url=server.base_url),
                     BatchConfig(**settings), str(tmp_path / "batch"), log=lambda line: None)


def requests(count):
  return {f"r{i}": {"model": "grader", "messages": [{"role": "user", "content": f"Hi {i}"}]}
          for i in range(count)}


def collect(runner, wanted, **kwargs):
  """Runs the batches and checks every request got exactly one result."""
  results = {}

  def on_result(custom_id, result):
    assert custom_id not in results, f"{custom_id} delivered twice"
    results[custom_id] = result

  runner.run(wanted.items, on_result, **kwargs)
  assert set(results) == set(wanted)
  return results


def test_answers_every_request_in_parts_under_the_limits(server, fake, tmp_path):
  fake.chat_handler = lambda body, attempt: Reply(text="answer " + body["messages"][0]["content"])
  runner = make_runner(server, tmp_path, max_requests=4)
  results = collect(runner, requests(10))
  assert {cid: r.text for cid, r in results.items()} == {f"r{i}": f"answer Hi {i}"
                                                         for i in range(10)}
  assert fake.stats["batches_created"] == 3  # 4 + 4 + 2.
  assert fake.stats["batch_polls"] >= 6  # Each batch was seen in progress first.
  by_size = make_runner(server, tmp_path / "b", max_bytes=400)
  collect(by_size, requests(10))
  assert fake.stats["batches_created"] > 3 + 1
  for entry in by_size.state["batches"]:
    assert (tmp_path / "b" / "batch" / entry["input_path"]).stat().st_size <= 400


def test_failed_and_unusable_requests_are_submitted_again(server, fake, tmp_path):
  def handler(body, attempt):
    content = body["messages"][0]["content"]
    if content == "Hi 1" and attempt == 1:
      return Reply(status=500, error="hiccup")
    if content == "Hi 2" and attempt < 3:
      return Reply(text="garbage")
    if content == "Hi 3":
      return Reply(status=500, error="never works")
    return Reply(text="ok")

  def parse(text):
    if text != "ok":
      raise UnusableAnswer("not ok")

  temperatures = collections.defaultdict(list)

  def recording(body, attempt):
    temperatures[body["messages"][0]["content"]].append(body.get("temperature"))
    return handler(body, attempt)

  fake.chat_handler = recording
  results = collect(make_runner(server, tmp_path), requests(4), parse=parse,
                    retry_temperature=0.7)
  assert temperatures["Hi 2"] == [None, 0.7, 0.7]  # Unusable answers are asked again warmer.
  assert temperatures["Hi 1"] == [None, None]  # A server error is simply repeated.
  assert results["r0"].text == "ok" and results["r0"].attempts == 1
  assert results["r1"].text == "ok" and results["r1"].attempts == 2
  assert results["r2"].text == "ok" and results["r2"].attempts == 3
  assert results["r2"].raw_answers == ["garbage", "garbage", "ok"]
  assert results["r3"].text is None and results["r3"].attempts == 3
  assert results["r3"].error == "HTTP 500: never works"


def test_a_new_runner_resumes_from_the_state_file_without_resubmitting(server, fake, tmp_path):
  fake.chat_handler = lambda body, attempt: Reply(text="fine answer")
  first = make_runner(server, tmp_path, max_requests=3)
  first._submit(requests(6).items(), "turn1")  # pylint: disable=protected-access
  created = fake.stats["batches_created"]
  assert created == 2 and not any(b.get("downloaded") for b in first.state["batches"])
  # As if the process died here: a new runner reads the state and only polls and downloads.
  results = collect(make_runner(server, tmp_path, max_requests=3), requests(6))
  assert all(r.text == "fine answer" for r in results.values())
  assert fake.stats["batches_created"] == created
  # And asking again costs nothing at all.
  uploads = fake.stats["files_uploaded"]
  collect(make_runner(server, tmp_path), requests(6))
  assert fake.stats["files_uploaded"] == uploads


def test_refused_credentials_stop_clearly(server, fake, tmp_path, monkeypatch):
  monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong-key-999")
  fake.api_key = "right"
  runner = make_runner(server, tmp_path)
  with pytest.raises(AuthStop, match="refused our credentials") as info:
    collect(runner, requests(2))
  assert "sk-wrong-key-999" not in str(info.value)


def test_grade_in_batch_mode(server, fake, tmp_path):
  del fake
  markers = ["[prose]", "[500]", "[truncated]", "[range]", "[down]"]
  path = write_jsonl(tmp_path / "c.jsonl", story_rows(12, markers=markers))
  out = tmp_path / "out"
  args = [f"--completions={path}", f"--output_dir={out}", f"--base_url={server.base_url}",
          "--mode=batch", "--batch_poll_interval=0.01", "--batch_max_requests=5"]
  result = run_grade(args)
  assert result.returncode == 0, result.stderr
  rows = {r["id"]: r for r in read_rows(out / "grades.jsonl")}
  assert len(rows) == 12
  status = {m: rows[story_rows(12, markers=markers)[i]["id"]]["status"]
            for i, m in enumerate(markers)}
  assert status == {"[prose]": "ok", "[500]": "ok", "[truncated]": "ok", "[range]": "failed",
                    "[down]": "failed"}
  summary = json.loads((out / "summary.json").read_text())
  assert summary["graded"] == 10 and summary["failed"] == 2
  assert (out / "batch" / "state.json").exists()
  # A rerun has nothing to grade.
  assert run_grade(args).returncode == 0
  assert len(read_rows(out / "grades.jsonl")) == 12
