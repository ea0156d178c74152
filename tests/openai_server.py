"""A scriptable OpenAI-compatible HTTP server on loopback, for the grading and datagen tests.

It speaks the real wire format (`/v1/chat/completions`, `/v1/files`, `/v1/batches`) over a real
socket, so the `openai` client, retries and timeouts are exercised end to end. By default it is a
well-behaved teacher (grading conversations) and storyteller (datagen prompts). Markers inside
the graded completion make it misbehave on purpose, deterministically per conversation:

  [prose]      answers the score turn in prose instead of JSON
  [429]        the first attempt of each turn gets 429 with Retry-After
  [500]        the first attempt of each turn gets 500
  [slow]       the first attempt of each turn answers after `slow_s` (past the client timeout)
  [truncated]  the first attempt of the score turn is cut-off JSON
  [range]      the score turn always gives grammar 11 (ends failed)
  [down]       always 500 (ends failed)
  [score=N]    every score is N

Server-wide switches: `api_key` (401 for any other key, echoing the key it got so tests can
check it is scrubbed), `structured_output=False` (400 on `response_format`), `latency_s`, and
`chat_handler` to replace the default answers entirely.

Run standalone (the benchmark does): `python tests/openai_server.py --latency=0.05` prints
`PORT <n>` once listening.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import hashlib
import json
import re
import threading
import time
from typing import Any, Callable

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route


@dataclasses.dataclass
class Reply:
  """What the server does with one chat request."""
  text: str | None = None
  status: int = 200
  headers: dict[str, str] = dataclasses.field(default_factory=dict)
  delay_s: float = 0.0
  error: str = ""


def _conversation_text(messages: list[dict[str, Any]]) -> str:
  return "\n".join(str(m.get("content", "")) for m in messages)


class FakeOpenAI:
  """State and behaviour of the fake endpoint.

  Attributes:
    latency_s: delay before every answer.
    slow_s: delay of a `[slow]` first attempt.
    retry_after_s: Retry-After sent with 429.
    api_key: if set, any other bearer token gets 401.
    structured_output: if False, a request with `response_format` gets 400.
    chat_handler: optional `(body, attempt) -> Reply` replacing the default behaviour.
    stats: counters: requests, status codes, max requests in flight, response_format seen.
  """

  def __init__(self, *, latency_s: float = 0.0, slow_s: float = 2.0, retry_after_s: float = 0.05,
               api_key: str | None = None, structured_output: bool = True,
               chat_handler: Callable[[dict, int], Reply] | None = None):
    self.latency_s = latency_s
    self.slow_s = slow_s
    self.retry_after_s = retry_after_s
    self.api_key = api_key
    self.structured_output = structured_output
    self.chat_handler = chat_handler
    self.stats = collections.Counter()
    self.attempts = collections.Counter()
    self.in_flight = 0
    self.files: dict[str, dict[str, Any]] = {}
    self.batches: dict[str, dict[str, Any]] = {}
    self.batch_hook: Callable[[dict[str, Any]], None] | None = None
    self.batch_polls_before_done = 1

  # ---- chat completions -------------------------------------------------------------------

  def default_reply(self, body: dict[str, Any], attempt: int) -> Reply:
    messages = body.get("messages", [])
    text = _conversation_text(messages)
    score_turn = any(m.get("role") == "assistant" for m in messages)
    first = attempt == 1
    if "[down]" in text:
      return Reply(status=500, error="the server is down")
    if "[429]" in text and first:
      return Reply(status=429, error="Rate limit reached",
                   headers={"retry-after": f"{self.retry_after_s:g}"})
    if "[500]" in text and first:
      return Reply(status=500, error="internal error")
    if "[slow]" in text and first:
      return Reply(text="Too late.", delay_s=self.slow_s)
    if "Summarize the story in one simple sentence" in text:
      return Reply(text="Lily and Tom play together and learn that sharing makes everyone happy.")
    if "Write a short story" in text:
      return Reply(text=storyteller_answer(messages[-1]["content"]))
    if not score_turn:
      return Reply(text="The pupil finished the cut sentence sensibly and kept the same "
                        "characters. The grammar is mostly correct and the story is simple.")
    match = re.search(r"\[score=(\d+)\]", text)
    score = int(match.group(1)) if match else 7
    schema = ((body.get("response_format") or {}).get("json_schema") or {}).get("schema")
    if schema:
      names = [n for n in schema["properties"] if n != "age_group"]
    else:  # No schema: the score names the last question mentions.
      asked = messages[-1]["content"].lower()
      names = [n for n in ("instructions", "grammar", "creativity", "consistency", "plot")
               if n in asked]
    scores = {name: score for name in names}
    if "creativity" in scores:
      scores["creativity"] = max(1, score - 1)
    if "[range]" in text:
      scores["grammar"] = 11
    if "[truncated]" in text and first:
      return Reply(text=json.dumps(scores)[:18])
    if "[prose]" in text:
      lines = [f"{name.capitalize()}: {value}/10" for name, value in scores.items()]
      return Reply(text="Here are my marks.\n" + "\n".join(lines) + "\nAge group: C (6-7)")
    return Reply(text=json.dumps(scores | {"age_group": "C"}))

  def _refuse(self, request: Request) -> Response | None:
    """A 401 echoing the key it got (real servers show part of it), if it is not ours."""
    auth = request.headers.get("authorization", "")
    if self.api_key is not None and auth != f"Bearer {self.api_key}":
      self.stats["status_401"] += 1
      return _error(401, f"Incorrect API key provided: {auth.removeprefix('Bearer ')}.",
                    "invalid_api_key")
    return None

  async def chat(self, request: Request) -> Response:
    self.stats["requests"] += 1
    self.in_flight += 1
    self.stats["max_in_flight"] = max(self.stats["max_in_flight"], self.in_flight)
    try:
      refused = self._refuse(request)
      if refused is not None:
        return refused
      body = json.loads(await request.body())
      if "response_format" in body:
        self.stats["response_format"] += 1
        if not self.structured_output:
          self.stats["status_400"] += 1
          return _error(400, "response_format json_schema is not supported by this server.",
                        "invalid_request_error")
      key = hashlib.sha256(json.dumps(body["messages"], sort_keys=True).encode()).hexdigest()
      self.attempts[key] += 1
      handler = self.chat_handler or self.default_reply
      reply = handler(body, self.attempts[key])
      delay = self.latency_s + reply.delay_s
      if delay:
        await asyncio.sleep(delay)
      self.stats[f"status_{reply.status}"] += 1
      if reply.status != 200:
        response = _error(reply.status, reply.error or "error", "server_error")
        response.headers.update(reply.headers)
        return response
      return Response(json.dumps(chat_completion(body, reply.text)),
                      media_type="application/json", headers=reply.headers)
    finally:
      self.in_flight -= 1

  # ---- files and batches (the Batch API) -------------------------------------------------

  async def upload_file(self, request: Request) -> Response:
    if (refused := self._refuse(request)) is not None:
      return refused
    form = _parse_multipart(request.headers["content-type"], await request.body())
    file_id = f"file-{len(self.files) + 1:04d}"
    self.files[file_id] = {"id": file_id, "object": "file", "bytes": len(form["file"]),
                           "created_at": int(time.time()), "filename": form["filename"],
                           "purpose": form.get("purpose", "batch"), "content": form["file"]}
    self.stats["files_uploaded"] += 1
    return JSONResponse({k: v for k, v in self.files[file_id].items() if k != "content"})

  async def file_content(self, request: Request) -> Response:
    if (refused := self._refuse(request)) is not None:
      return refused
    entry = self.files.get(request.path_params["file_id"])
    if entry is None:
      return _error(404, "No such file", "not_found")
    return Response(entry["content"], media_type="application/octet-stream")

  async def create_batch(self, request: Request) -> Response:
    if (refused := self._refuse(request)) is not None:
      return refused
    body = json.loads(await request.body())
    if body.get("input_file_id") not in self.files:
      return _error(400, "input_file_id does not exist", "invalid_request_error")
    batch_id = f"batch-{len(self.batches) + 1:04d}"
    batch = {"id": batch_id, "object": "batch", "endpoint": body["endpoint"],
             "input_file_id": body["input_file_id"], "completion_window": "24h",
             "status": "validating", "created_at": int(time.time()), "output_file_id": None,
             "error_file_id": None, "request_counts": {"total": 0, "completed": 0, "failed": 0},
             "metadata": body.get("metadata")}
    self.batches[batch_id] = batch
    self.stats["batches_created"] += 1
    self._run_batch(batch)
    return JSONResponse(batch)

  def _run_batch(self, batch: dict[str, Any]) -> None:
    """Answers every request of a batch at once (`batch_hook` may alter the outcome)."""
    lines = self.files[batch["input_file_id"]]["content"].decode().splitlines()
    out, errors = [], []
    for line in filter(None, lines):
      request = json.loads(line)
      key = hashlib.sha256(json.dumps(request["body"]["messages"], sort_keys=True)
                           .encode()).hexdigest()
      self.attempts[key] += 1
      handler = self.chat_handler or self.default_reply
      reply = handler(request["body"], self.attempts[key])
      self.stats["batch_requests"] += 1
      if reply.status == 200:
        out.append({"id": f"resp-{len(out)}", "custom_id": request["custom_id"],
                    "response": {"status_code": 200, "request_id": "req",
                                 "body": chat_completion(request["body"], reply.text)},
                    "error": None})
      else:
        errors.append({"id": f"err-{len(errors)}", "custom_id": request["custom_id"],
                       "response": {"status_code": reply.status, "request_id": "req",
                                    "body": {"error": {"message": reply.error}}},
                       "error": None})
    batch["request_counts"] = {"total": len(out) + len(errors), "completed": len(out),
                               "failed": len(errors)}
    for name, rows in (("output_file_id", out), ("error_file_id", errors)):
      if rows:
        file_id = f"file-{len(self.files) + 1:04d}"
        content = "".join(json.dumps(r) + "\n" for r in rows).encode()
        self.files[file_id] = {"id": file_id, "object": "file", "bytes": len(content),
                               "created_at": int(time.time()), "filename": f"{name}.jsonl",
                               "purpose": "batch_output", "content": content}
        batch[name] = file_id
    batch["status"] = "completed"
    batch["completed_at"] = int(time.time())
    if self.batch_hook is not None:
      self.batch_hook(batch)

  async def get_batch(self, request: Request) -> Response:
    if (refused := self._refuse(request)) is not None:
      return refused
    batch = self.batches.get(request.path_params["batch_id"])
    if batch is None:
      return _error(404, "No such batch", "not_found")
    self.stats["batch_polls"] += 1
    batch["polls"] = batch.get("polls", 0) + 1
    if batch["polls"] <= self.batch_polls_before_done:  # Still working, as far as you know.
      return JSONResponse(batch | {"status": "in_progress", "output_file_id": None,
                                   "error_file_id": None})
    return JSONResponse(batch)

  def app(self) -> Starlette:
    return Starlette(routes=[
        Route("/v1/chat/completions", self.chat, methods=["POST"]),
        Route("/v1/files", self.upload_file, methods=["POST"]),
        Route("/v1/files/{file_id}/content", self.file_content, methods=["GET"]),
        Route("/v1/batches", self.create_batch, methods=["POST"]),
        Route("/v1/batches/{batch_id}", self.get_batch, methods=["GET"]),
    ])


def storyteller_answer(prompt: str) -> str:
  """A short story that uses the words the prompt asks for (quoted in the prompt)."""
  words = re.findall(r'"([a-z]+)"', prompt)[:3]
  verb, noun, adjective = (words + ["play", "ball", "happy"])[:3]
  return (f"Once upon a time, there was a {adjective} little girl named Lily. She had a {noun} "
          f"that she loved very much. Every day she liked to {verb} with her friends in the "
          "park near her house.\n\nOne day, her friend Tom came to see her. \"Can I play "
          f"too?\" he asked. Lily smiled and said yes. They had lots of fun together with the "
          f"{noun} until the sun went down.\n\nWhen it was time to go home, Lily gave Tom a big "
          "hug. They knew that sharing makes everyone happy, and they played again the next day.")


def chat_completion(body: dict[str, Any], text: str) -> dict[str, Any]:
  prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in body.get("messages", []))
  completion_tokens = len(text.split())
  return {
      "id": "chatcmpl-test", "object": "chat.completion", "created": int(time.time()),
      "model": body.get("model", "test"),
      "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                   "finish_reason": "stop", "logprobs": None}],
      "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens},
  }


def _error(status: int, message: str, code: str) -> Response:
  return JSONResponse({"error": {"message": message, "type": code, "param": None,
                                 "code": code}}, status_code=status)


def _parse_multipart(content_type: str, body: bytes) -> dict[str, Any]:
  """Just enough multipart/form-data for the client's file upload."""
  boundary = re.search(r'boundary="?([^";]+)"?', content_type).group(1).encode()
  fields: dict[str, Any] = {}
  for part in body.split(b"--" + boundary):
    if b"\r\n\r\n" not in part:
      continue
    head, _, data = part.partition(b"\r\n\r\n")
    data = data[:-2] if data.endswith(b"\r\n") else data
    name = re.search(rb'name="([^"]+)"', head).group(1).decode()
    filename = re.search(rb'filename="([^"]*)"', head)
    if filename:
      fields["filename"] = filename.group(1).decode()
      fields[name] = data
    else:
      fields[name] = data.decode()
  return fields


class ServerThread:
  """Runs a `FakeOpenAI` with uvicorn on a free loopback port in a background thread."""

  def __init__(self, fake: FakeOpenAI):
    self.fake = fake
    self._server = uvicorn.Server(uvicorn.Config(
        fake.app(), host="127.0.0.1", port=0, log_level="warning", access_log=False,
        lifespan="off"))
    self._thread = threading.Thread(target=self._server.run, daemon=True)
    self.port = 0

  @property
  def base_url(self) -> str:
    return f"http://127.0.0.1:{self.port}/v1"

  def __enter__(self) -> ServerThread:
    self._thread.start()
    deadline = time.monotonic() + 20
    while not self._server.started:
      if time.monotonic() > deadline or not self._thread.is_alive():
        raise RuntimeError("the loopback OpenAI server did not start")
      time.sleep(0.01)
    self.port = self._server.servers[0].sockets[0].getsockname()[1]
    return self

  def __exit__(self, *exc) -> None:
    self._server.should_exit = True
    self._thread.join(timeout=10)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--port", type=int, default=0)
  parser.add_argument("--latency", type=float, default=0.0)
  args = parser.parse_args()
  fake = FakeOpenAI(latency_s=args.latency)
  config = uvicorn.Config(fake.app(), host="127.0.0.1", port=args.port, log_level="warning",
                          access_log=False, lifespan="off")
  server = uvicorn.Server(config)

  async def serve():
    task = asyncio.ensure_future(server.serve())
    while not server.started:
      await asyncio.sleep(0.01)
    print(f"PORT {server.servers[0].sockets[0].getsockname()[1]}", flush=True)
    await task

  try:
    import uvloop  # pylint: disable=g-import-not-at-top
    uvloop.run(serve())
  except ImportError:
    asyncio.run(serve())


if __name__ == "__main__":
  main()
