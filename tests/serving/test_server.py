"""The server through the official `openai` client and raw HTTP, on loopback."""

import asyncio
import json
import os
import pathlib
import signal
import subprocess
import sys
import threading

import httpx
import openai
import pytest
from starlette.testclient import TestClient

from tinystories_jax.sampling import SamplerConfig
from tinystories_jax.serving import Engine, Limits, create_app
from tinystories_jax.serving.engine import Job
from tinystories_jax.serving.protocol import parse_generation

from serving_helpers import LiveServer

MODEL = "wd"
LIMITS = Limits(max_body_bytes=4096, max_tokens=24, max_n=4)


@pytest.fixture(scope="module")
def server(writer):
  engine = Engine(writer, max_batch=8, max_queue=16)
  engine.start()
  with LiveServer(create_app(engine, model_id=MODEL, limits=LIMITS)) as live:
    yield live
  engine.begin_shutdown(0)
  engine.join(10)


@pytest.fixture(scope="module")
def client(server):
  return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=300)


def test_models_and_a_completion(client):
  assert [m.id for m in client.models.list().data] == [MODEL]
  out = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8, seed=1)
  [choice] = out.choices
  assert isinstance(choice.text, str) and choice.finish_reason in ("stop", "length")
  assert 1 <= out.usage.completion_tokens <= 8
  again = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8, seed=1)
  assert again.choices[0].text == choice.text  # a seed gives the same story


def test_chat_continues_the_last_user_message(client):
  plain = client.completions.create(model=MODEL, prompt="Tom had a red ball.", max_tokens=8,
                                    seed=7)
  chat = client.chat.completions.create(
      model=MODEL, max_tokens=8, seed=7,
      messages=[{"role": "system", "content": "You tell stories."},
                {"role": "user", "content": "Lily"},
                {"role": "assistant", "content": "..."},
                {"role": "user", "content": "Tom had a red ball."}])
  assert chat.choices[0].message.role == "assistant"
  assert chat.choices[0].message.content == plain.choices[0].text


def test_streaming_joins_to_the_whole_text(client):
  whole = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=20,
                                    seed=3)
  pieces, reasons = [], []
  for event in client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=20,
                                         seed=3, stream=True):
    pieces.append(event.choices[0].text)
    reasons.append(event.choices[0].finish_reason)
  assert "".join(pieces) == whole.choices[0].text
  assert reasons[-1] == whole.choices[0].finish_reason and len(pieces) >= 2
  chat_pieces = []
  for event in client.chat.completions.create(
      model=MODEL, messages=[{"role": "user", "content": "Once upon a time"}], max_tokens=20,
      seed=3, stream=True):
    chat_pieces.append(event.choices[0].delta.content or "")
  assert "".join(chat_pieces) == whole.choices[0].text


def test_n_and_a_list_of_prompts(client):
  out = client.completions.create(model=MODEL, prompt=["Once upon a time", "Tom"], n=2,
                                  max_tokens=12, seed=5, temperature=1.0)
  assert [c.index for c in out.choices] == [0, 1, 2, 3]
  assert out.choices[0].text != out.choices[1].text  # n samples, not n copies
  alone = client.completions.create(model=MODEL, prompt="Tom", n=2, max_tokens=12, seed=5,
                                    temperature=1.0)
  assert [c.text for c in out.choices[2:]] == [c.text for c in alone.choices]


def test_stop_strings_cut_the_text(client):
  whole = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=20,
                                    seed=3).choices[0].text
  # The first two visible characters after the start: the seed makes the text the same each run.
  starts = [i for i in range(2, len(whole) - 1) if not whole[i:i + 2].isspace()]
  assert starts, f"20 sampled tokens gave almost no text: {whole!r}"
  stop = whole[starts[0]:starts[0] + 2]
  cut = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=20, seed=3,
                                  stop=[stop]).choices[0]
  assert cut.text == whole[:whole.find(stop)] and cut.finish_reason == "stop"


def test_malformed_requests_get_openai_errors(client, server):
  with pytest.raises(openai.NotFoundError) as e:
    client.completions.create(model="gpt-4", prompt="x", max_tokens=4)
  assert e.value.body["code"] == "model_not_found"
  with pytest.raises(openai.UnprocessableEntityError):
    client.completions.create(model=MODEL, prompt="x", max_tokens=4, n=99)
  with pytest.raises(openai.UnprocessableEntityError):
    client.completions.create(model=MODEL, prompt="x", max_tokens=10_000)
  with pytest.raises(openai.BadRequestError):
    client.completions.create(model=MODEL, prompt="x", max_tokens=4, logprobs=3)
  url = server.base_url
  cases = [
      ("/completions", b"{not json", 400, "invalid_json"),
      ("/completions", b"[1, 2]", 400, "invalid_body"),
      ("/completions", json.dumps({"model": MODEL}).encode(), 400, "missing_required_parameter"),
      ("/chat/completions", json.dumps({"messages": [{"role": "system", "content": "x"}]}
                                       ).encode(), 400, "missing_user_message"),
      ("/completions", json.dumps({"prompt": 5}).encode(), 422, "invalid_type"),
      ("/completions", json.dumps({"prompt": "x", "temperature": "hot"}).encode(), 422,
       "invalid_type"),
      ("/completions", json.dumps({"prompt": "x" * 5000}).encode(), 413, "body_too_large"),
      ("/completions", json.dumps({"prompt": "Tom " * 700}).encode(), 422,
       "context_length_exceeded"),
      ("/completions", json.dumps({"prompt": "x", "stream": True, "stream_options": "yes"}
                                  ).encode(), 400, "invalid_type"),
      ("/completions", b"[" * 1900 + b"]" * 1900, 400, "invalid_json"),  # nested past recursion
  ]
  for path, body, status, code in cases:
    r = httpx.post(url + path, content=body, headers={"Content-Type": "application/json"},
                   timeout=300)
    assert r.status_code == status, (path, body[:40], r.text)
    assert r.json()["error"]["code"] == code
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
  r = httpx.get(url.replace("/v1", "/nowhere"))
  assert r.status_code == 404 and "error" in r.json()
  r = httpx.get(url + "/completions")
  assert r.status_code == 405 and r.json()["error"]["type"] == "invalid_request_error"


def test_a_full_queue_gets_429_and_shutdown_gets_503(writer):
  engine = Engine(writer, max_queue=0)  # never started: nothing may wait
  with TestClient(create_app(engine, model_id=MODEL, limits=LIMITS)) as http:
    r = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
    assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
    engine.begin_shutdown(0)
    r = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
    assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"


def test_an_unexpected_error_still_answers_in_openai_json(writer, monkeypatch):
  from tinystories_jax.serving import app as app_lib  # pylint: disable=import-outside-toplevel

  async def broken(self, request):
    raise RuntimeError("boom")

  monkeypatch.setattr(app_lib.Service, "list_models", broken)
  with TestClient(create_app(Engine(writer), model_id=MODEL, limits=LIMITS),
                  raise_server_exceptions=False) as http:
    r = http.get("/v1/models")
  assert r.status_code == 500
  assert r.json()["error"]["code"] == "internal_error" and "boom" not in r.text


def test_a_queued_stream_turned_away_at_shutdown_gets_503(writer):
  """The stream's headers wait for its first event: a request still queued when shutdown begins
  gets a 503 status, not 200 and an error event."""
  engine = Engine(writer, max_queue=1)  # never started: the request waits in the queue
  out = {}
  with TestClient(create_app(engine, model_id=MODEL, limits=LIMITS)) as http:
    def post():
      out["r"] = http.post("/v1/completions",
                           json={"prompt": "x", "max_tokens": 2, "stream": True})
    thread = threading.Thread(target=post)
    thread.start()
    for _ in range(200):
      if engine._queue:  # pylint: disable=protected-access
        break
      threading.Event().wait(0.01)
    engine.begin_shutdown(0)
    thread.join(30)
  assert out["r"].status_code == 503
  assert out["r"].json()["error"]["code"] == "shutting_down"


def test_compatible_requests_share_one_batch_and_keep_their_own_text(writer):
  """Two queued requests with the same settings decode as one batch, each as if alone."""

  async def scenario():
    engine = Engine(writer, max_batch=8)
    jobs = []
    for prompt, seed in (("Once upon a time", 1), ("Tom", 2)):
      req = parse_generation({"prompt": prompt, "max_tokens": 10, "seed": seed}, "completion",
                             LIMITS)
      jobs.append(Job(request=req, encoded=[writer.encode_prompt(prompt)], max_new=10,
                      loop=asyncio.get_running_loop(), events=asyncio.Queue()))
      engine.submit(jobs[-1])
    engine.start()
    results = [await job.events.get() for job in jobs]
    engine.begin_shutdown(0)
    engine.join(60)  # the worker counts a batch after delivering it
    return engine.batches_run, results

  batches, results = asyncio.run(scenario())
  assert batches == 1
  for (kind, [story]), (prompt, seed) in zip(results, (("Once upon a time", 1), ("Tom", 2))):
    assert kind == "done"
    [[alone]] = writer.complete([prompt], SamplerConfig(max_new_tokens=10, seed=seed),
                                streams=[0])
    assert story.text == alone.text


def test_sigterm_finishes_the_request_in_flight_and_exits_cleanly(serving_workdir):
  root = pathlib.Path(__file__).resolve().parents[2]
  env = dict(os.environ, PYTHONPATH=str(root), JAX_PLATFORMS="cpu")
  proc = subprocess.Popen(
      [sys.executable, "-m", "tinystories_jax.serve", f"--workdir={serving_workdir}", "--port=0",
       "--model_name=wd", "--grace_s=300"],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
  try:
    line = proc.stdout.readline()
    assert "serving wd" in line, line + proc.stderr.read()
    base = line.strip().split(" at ")[1]
    events, first = [], threading.Event()

    def stream():
      with httpx.stream("POST", base + "/completions", timeout=300,
                        json={"model": "wd", "prompt": "Once upon a time", "max_tokens": 100,
                              "min_tokens": 100, "stream": True, "seed": 0}) as r:
        for data in r.iter_lines():
          if data.startswith("data: "):
            events.append(data[6:])
            first.set()

    reader = threading.Thread(target=stream)
    reader.start()
    assert first.wait(300)
    proc.send_signal(signal.SIGTERM)
    reader.join(120)
    assert proc.wait(120) == 0
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert "server stopped" in proc.stdout.read()
  finally:
    if proc.poll() is None:
      proc.kill()
