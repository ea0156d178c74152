"""Fixtures for the grading tests: the loopback OpenAI server and completions files."""

import json
import os
import subprocess
import sys

import pytest

import openai_server

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def fake():
  """A well-behaved fake endpoint; tests adjust its switches before use."""
  return openai_server.FakeOpenAI()


@pytest.fixture
def server(fake):
  """`fake` served on a free loopback port for the duration of the test."""
  with openai_server.ServerThread(fake) as running:
    yield running


def write_jsonl(path, rows):
  with open(path, "w", encoding="utf-8") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")
  return str(path)


def story_rows(count, model="model-a", markers=()):
  """`count` completion rows of the packaged beginnings; markers go into the first rows."""
  from tinystories_jax.grading import evalsets  # pylint: disable=g-import-not-at-top
  beginnings = evalsets.load_eval_set("stories")
  rows = []
  for i in range(count):
    beginning = beginnings[i % len(beginnings)]
    marker = f" {markers[i]}" if i < len(markers) else ""
    rows.append({"id": f"{beginning['id']}-{i}", "prompt": beginning["prompt"],
                 "completion": f" she was happy.{marker} The end.", "model": model,
                 "sampler": {"temperature": 1.0}})
  return rows


def run_grade(args, *, env=None, timeout=120):
  """Runs `python -m tinystories_jax.grade` and returns the CompletedProcess."""
  full_env = dict(os.environ)
  full_env.pop("OPENAI_API_KEY", None)
  full_env.update(env or {})
  return subprocess.run(
      [sys.executable, "-m", "tinystories_jax.grade", "--progress=false", *args],
      capture_output=True, text=True, env=full_env, cwd=REPO_ROOT, timeout=timeout)


def read_rows(path):
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]
