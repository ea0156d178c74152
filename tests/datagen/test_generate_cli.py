"""`python -m tinystories_jax.generate_data` end to end against the loopback server."""

import collections
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

from openai_server import Reply, storyteller_answer
from tinystories_jax.datagen import instruct, prompts, vocabulary

from .conftest import REPO_ROOT, read_rows, run_generate, write_words

FAST = ["--backoff=0.01", "--max_retries=2", "--timeout=5"]


def test_rejections_are_counted_by_reason(server, fake, tmp_path):
  words = write_words(tmp_path / "words.txt")  # One word each: every plan asks for the same.
  good = storyteller_answer('"play" "ball" "happy"')
  script = [
      "I'm sorry, but I cannot write that.",
      "Sure! Here is your story:\n\n" + good,
      "Il était une fois une petite fille très heureuse qui jouait avec sa balle. " * 5,
      "Lily was happy. She liked to play with her ball.",
      " ".join([good] * 8),
      good.replace("ball", "kite"),
      good,
      good,  # A duplicate of the story just kept.
  ] + [good.replace("Lily", name) for name in ("Mia", "Sue", "Ann", "Zoe")]
  calls = []

  def handler(body, attempt):
    del body, attempt
    calls.append(1)
    return Reply(text=script[min(len(calls), len(script)) - 1])

  fake.chat_handler = handler
  out = tmp_path / "out" / "stories.jsonl"
  result = run_generate(["--num_stories=5", f"--output={out}", f"--base_url={server.base_url}",
                         f"--words={words}", "--concurrency=1", *FAST])
  assert result.returncode == 0, result.stderr
  stats = json.loads((tmp_path / "out" / "stories.stats.json").read_text())
  assert stats["kept"] == 5 and stats["attempts"] == 12
  assert stats["rejected_by_reason"] == {
      "refusal": 1, "chatter": 1, "not_english": 1, "too_short": 1, "too_long": 1,
      "missing_word": 1, "duplicate": 1}
  assert stats["rejection_rates"]["duplicate"] == pytest.approx(1 / 12)
  assert stats["usage"]["prompt_tokens"] > 0 and stats["usage"]["requests"] == 12
  assert "distinct n-gram ratio" in result.stdout and "refusal 1" in result.stdout
  rejected = read_rows(tmp_path / "out" / "stories.rejected.jsonl")
  assert {r["reason"] for r in rejected} == set(stats["rejected_by_reason"])
  kept = read_rows(out)
  assert len({r["story"] for r in kept}) == 5
  for row in kept:
    assert set(row) >= {"id", "story", "prompt", "words", "features", "summary", "model", "usage"}
    assert row["words"] == {"verb": "play", "noun": "ball", "adjective": "happy"}


def test_rows_record_the_plan_and_txt_layout_matches(server, fake, tmp_path):
  del fake
  out = tmp_path / "stories.jsonl"
  result = run_generate(["--num_stories=12", f"--output={out}", f"--base_url={server.base_url}",
                         "--seed=5", *FAST])
  assert result.returncode == 0, result.stderr
  rows = read_rows(out)
  vocab = vocabulary.packaged()
  for row in rows:
    plan = prompts.make_plan(5, row["index"], vocab)
    assert row["prompt"] == prompts.render_prompt(plan)
    assert row["features"] == list(plan.features)
    assert row["words"] == {"verb": plan.verb, "noun": plan.noun, "adjective": plan.adjective}
  txt = (tmp_path / "stories.txt").read_text()
  assert txt.count("<|endoftext|>\n") == 12
  assert txt.split("\n<|endoftext|>\n")[:-1] == [r["story"] for r in rows]


def test_instruct_rows_render_and_parse_back(server, fake, tmp_path):
  del fake
  out = tmp_path / "inst.jsonl"
  result = run_generate(["--num_stories=16", f"--output={out}", f"--base_url={server.base_url}",
                         "--instruct", *FAST])
  assert result.returncode == 0, result.stderr
  rows = read_rows(out)
  present = collections.Counter()
  for row in rows:
    assert row["summary"].endswith(".")
    parsed, story = instruct.parse(row["text"])
    assert story == row["story"]
    given = row["instructions"]
    assert parsed == instruct.Instructions(
        features=tuple(given["features"]) if given["features"] is not None else None,
        words=tuple(given["words"]) if given["words"] is not None else None,
        summary=given["summary"], random_sentence=given["random_sentence"])
    if parsed.random_sentence:
      assert parsed.random_sentence in " ".join(story.split())
    present.update(k for k, v in given.items() if v is not None)
  assert set(present) == {"features", "words", "summary", "random_sentence"}
  assert all(n < len(rows) for n in present.values())  # Each line is sometimes absent.
  blocks = (tmp_path / "inst.txt").read_text().split("<|endoftext|>\n")
  assert "Story: " in blocks[0]


def test_killed_run_resumes_with_each_story_exactly_once(server, fake, tmp_path):
  fake.latency_s = 0.03
  out = tmp_path / "stories.jsonl"
  args = [sys.executable, "-m", "tinystories_jax.generate_data", "--progress=false",
          "--num_stories=150", f"--output={out}", f"--base_url={server.base_url}",
          "--concurrency=8", *FAST]
  env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
  process = subprocess.Popen(args, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
  deadline = time.monotonic() + 60
  while time.monotonic() < deadline:
    if out.exists() and out.read_bytes().count(b"\n") >= 30:
      break
    time.sleep(0.02)
  process.send_signal(signal.SIGKILL)
  process.wait()
  before = out.read_bytes().count(b"\n")
  assert 30 <= before < 150, "the kill must land mid-run"
  result = run_generate(args[4:])
  assert result.returncode == 0, result.stderr
  rows = read_rows(out)
  ids = collections.Counter(r["id"] for r in rows)
  assert len(rows) == 150 and max(ids.values()) == 1
  assert sorted(r["index"] for r in rows) == list(range(150))
  assert (tmp_path / "stories.txt").read_text().count("<|endoftext|>") == 150
  # Run again: nothing to do, nothing sent.
  requests = fake.stats["requests"]
  assert run_generate(args[4:]).returncode == 0
  assert fake.stats["requests"] == requests


def test_a_refusing_endpoint_stops_the_run_and_the_rerun_sends_again(server, fake, tmp_path):
  """A local server that caps answers below our default refuses every request: the run stops
  after FAILURE_STREAK failures in a row, naming the server's error, instead of burning through
  every plan. The rerun with --max_tokens under the cap resumes and sends the failed plans
  again, first (plan 0 becomes story 0)."""
  seen = []

  def handler(body, attempt):
    del attempt
    seen.append(body["max_tokens"])
    if body["max_tokens"] > 300:
      return Reply(status=422, error=f"max_tokens must be at most 300, got {body['max_tokens']}")
    return fake.default_reply(body, 0)

  fake.chat_handler = handler
  out = tmp_path / "s.jsonl"
  base = ["--num_stories=30", f"--output={out}", f"--base_url={server.base_url}",
          "--concurrency=1", *FAST]
  result = run_generate(base)
  assert result.returncode != 0 and "Traceback" not in result.stderr
  assert "The last 20 requests all failed" in result.stderr, result.stderr
  assert "HTTP 422: max_tokens must be at most 300, got 1000" in result.stderr
  assert len(seen) == 20  # 422 is not retried, and nothing is sent past the streak
  seen.clear()
  result = run_generate(base + ["--max_tokens=300"])
  assert result.returncode == 0, result.stderr
  assert set(seen) == {300}
  kept = read_rows(out)
  assert len(kept) == 30 and sorted(r["index"] for r in kept) == list(range(30))
  stats = json.loads((tmp_path / "s.stats.json").read_text())
  assert stats["rejected_by_reason"] == {"request_failed": 20} and stats["attempts"] == 50


def test_a_hopeless_rejection_rate_stops_with_the_reasons(server, fake, tmp_path):
  fake.chat_handler = lambda body, attempt: Reply(text="I'm sorry, but I cannot write that.")
  out = tmp_path / "s.jsonl"
  result = run_generate(["--num_stories=1", f"--output={out}", f"--base_url={server.base_url}",
                         *FAST])
  assert result.returncode != 0 and "Traceback" not in result.stderr
  assert "Stopped after 23 prompts with only 0 of 1 stories kept; rejected: refusal 23." in (
      result.stderr), result.stderr


def test_resume_with_other_settings_is_refused(server, fake, tmp_path):
  del fake
  out = tmp_path / "s.jsonl"
  base = ["--num_stories=2", f"--output={out}", f"--base_url={server.base_url}", *FAST]
  assert run_generate(base + ["--seed=1"]).returncode == 0
  result = run_generate(base + ["--seed=2"])
  assert result.returncode != 0 and "Traceback" not in result.stderr
  assert "seed differ" in result.stderr


@pytest.mark.parametrize("args,message", [
    (["--num_stories=0"], "at least 1"),
    (["--max_tokens=0"], "--max_tokens must be at least 1"),
    (["--min_words=500", "--max_words=100"], "leave no story length"),
    (["--feature_probability=1.5"], "is not a probability"),
    (["--features=sparkles"], "Unknown story feature"),
    (["--words=/no/such/file.txt"], "does not exist"),
])
def test_bad_flags_are_one_clear_line(tmp_path, args, message):
  result = run_generate(["--num_stories=3", f"--output={tmp_path / 's.jsonl'}",
                         "--base_url=http://127.0.0.1:9/v1", *args])
  assert result.returncode != 0
  assert message in result.stderr and "Traceback" not in result.stderr


def test_output_feeds_prepare_and_training(server, fake, tmp_path):
  del fake
  out = tmp_path / "stories.jsonl"
  assert run_generate(["--num_stories=20", f"--output={out}", f"--base_url={server.base_url}",
                       *FAST]).returncode == 0
  for source, name in ((out, "from_jsonl"), (tmp_path / "stories.txt", "from_txt")):
    result = subprocess.run(
        [sys.executable, "-m", "tinystories_jax.prepare", f"--input={source}",
         f"--output_dir={tmp_path / name}", "--vocab_size=300", "--valid_fraction=0.2"],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    metadata = json.loads((tmp_path / name / "metadata.json").read_text())
    assert metadata["cleaning"]["train"]["input"] == 20
  # A few training steps on what was generated.
  workdir = tmp_path / "run"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  result = subprocess.run(
      [sys.executable, "-m", "tinystories_jax.train", "--config=configs/quickstart.py",
       f"--workdir={workdir}", f"--config.data.dir={tmp_path / 'from_jsonl'}",
       "--config.train.steps=3", "--config.train.batch_size=4", "--config.train.seq_len=32",
       "--config.train.log_every=1", "--config.train.eval_every=3",
       "--config.train.eval_batches=1", "--config.train.checkpoint_every=3"],
      capture_output=True, text=True, cwd=REPO_ROOT, timeout=600, env=env)
  assert result.returncode == 0, result.stderr[-2000:]
  metrics = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert metrics[-1]["step"] == 3
  assert all(math.isfinite(m["train_loss"]) for m in metrics if "train_loss" in m)
  assert any("eval_loss" in m for m in metrics)


def test_datagen_never_imports_jax():
  code = ("import sys, pkgutil, importlib, tinystories_jax.generate_data; "
          "import tinystories_jax.datagen as d; "
          "[importlib.import_module('tinystories_jax.datagen.' + m.name) "
          " for m in pkgutil.iter_modules(d.__path__)]; "
          "bad = [m for m in sys.modules "
          "       if m == 'jax' or m.startswith(('jax.', 'jaxlib', 'flax'))]; "
          "print(bad); sys.exit(1 if bad else 0)")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=REPO_ROOT)
  assert result.returncode == 0, result.stdout + result.stderr


def test_batch_mode_generates_instruct_stories_and_resumes_for_free(server, fake, tmp_path):
  out = tmp_path / "stories.jsonl"
  args = ["--num_stories=12", f"--output={out}", f"--base_url={server.base_url}", "--instruct",
          "--mode=batch", "--batch_poll_interval=0.01", "--batch_max_requests=5"]
  result = run_generate(args)
  assert result.returncode == 0, result.stderr
  rows = read_rows(out)
  assert len(rows) == 12 and all(r["summary"] for r in rows)
  assert fake.stats["batches_created"] == 6  # 12 stories and 12 summaries, 5 per batch.
  assert (tmp_path / "stories.batch" / "state.json").exists()
  stats = json.loads((tmp_path / "stories.stats.json").read_text())
  assert stats["kept"] == 12 and stats["cost_usd"] > 0
  created = fake.stats["batches_created"]
  assert run_generate(args).returncode == 0
  assert fake.stats["batches_created"] == created and len(read_rows(out)) == 12


def test_unreachable_endpoint_is_a_clear_stop(tmp_path):
  out = tmp_path / "s.jsonl"
  result = run_generate(["--num_stories=30", f"--output={out}",
                         "--base_url=http://127.0.0.1:9/v1", "--backoff=0.01"])
  assert result.returncode != 0 and "Traceback" not in result.stderr
  assert "check that the server is running" in result.stderr
  assert not read_rows(out) and not read_rows(tmp_path / "s.rejected.jsonl")
