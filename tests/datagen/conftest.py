"""Fixtures for the datagen tests: the shared loopback OpenAI server, and running the main."""

import json
import os
import subprocess
import sys

import pytest

import openai_server

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def fake():
  return openai_server.FakeOpenAI()


@pytest.fixture
def server(fake):
  with openai_server.ServerThread(fake) as running:
    yield running


def run_generate(args, *, timeout=120):
  env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
  return subprocess.run(
      [sys.executable, "-m", "tinystories_jax.generate_data", "--progress=false", *args],
      capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=timeout)


def read_rows(path):
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def write_words(path, nouns=("ball",), verbs=("play",), adjectives=("happy",)):
  text = ("[nouns]\n" + "\n".join(nouns) + "\n[verbs]\n" + "\n".join(verbs) +
          "\n[adjectives]\n" + "\n".join(adjectives) + "\n")
  path.write_text(text)
  return str(path)
