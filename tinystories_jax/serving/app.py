"""The Starlette application: OpenAI's `/v1/models`, `/v1/completions`, `/v1/chat/completions`.

Starlette (with uvicorn) is the ASGI stack: small, typed, maintained by the encode team behind
httpx and uvicorn, already a dependency of the project's test server, and it streams server-sent
events with a plain async generator. FastAPI would add pydantic and a second validation layer for
the handful of fields OpenAI's format has; protocol.py checks them by hand so every error comes out
in OpenAI's shape with the status the docs promise.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from typing import Any

from absl import logging
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from tinystories_jax.serving import protocol
from tinystories_jax.serving.engine import Engine, Job
from tinystories_jax.serving.protocol import APIError, Limits


def error_response(e: APIError) -> JSONResponse:
  headers = {"Retry-After": "1"} if e.status in (429, 503) else None
  return JSONResponse(e.body(), status_code=e.status, headers=headers)


class Service:
  """Request handling over one engine and model."""

  def __init__(self, engine: Engine, *, model_id: str, limits: Limits):
    self.engine = engine
    self.writer = engine.writer
    self.model_id = model_id
    self.limits = limits
    self.created = int(time.time())

  def model_card(self) -> dict[str, Any]:
    return {"id": self.model_id, "object": "model", "created": self.created,
            "owned_by": "tinystories-jax"}

  async def list_models(self, request: Request):
    del request
    return JSONResponse({"object": "list", "data": [self.model_card()]})

  async def get_model(self, request: Request):
    if request.path_params["model"] != self.model_id:
      return error_response(self._unknown_model(request.path_params["model"]))
    return JSONResponse(self.model_card())

  def _unknown_model(self, name: str) -> APIError:
    return APIError(404, f"The model '{name}' does not exist; this server serves "
                    f"'{self.model_id}'.", param="model", code="model_not_found")

  async def _body(self, request: Request) -> Any:
    length = request.headers.get("content-length")
    cap = self.limits.max_body_bytes
    if length is not None and length.isdigit() and int(length) > cap:
      raise APIError(413, f"The request body is {length} bytes; the limit is {cap}.",
                     code="body_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
      size += len(chunk)
      if size > cap:
        raise APIError(413, f"The request body exceeds the {cap}-byte limit.",
                       code="body_too_large")
      chunks.append(chunk)
    try:
      return json.loads(b"".join(chunks))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise APIError(400, f"The request body is not valid JSON ({e}).",
                     code="invalid_json") from None
    except RecursionError:
      raise APIError(400, "The request body nests JSON too deeply.", code="invalid_json") from None

  async def completions(self, request: Request):
    return await self._generate(request, "completion")

  async def chat_completions(self, request: Request):
    return await self._generate(request, "chat")

  async def _generate(self, request: Request, kind: str):
    try:
      body = await self._body(request)
      req = protocol.parse_generation(body, kind, self.limits)
      if req.model is not None and req.model != self.model_id:
        raise self._unknown_model(req.model)
      stream_options = body.get("stream_options") if isinstance(body, dict) else None
      if stream_options is not None and not isinstance(stream_options, dict):
        raise APIError(400, "'stream_options' must be an object, e.g. {\"include_usage\": true}.",
                       param="stream_options", code="invalid_type")
      if isinstance(body, dict) and body.get("seed") is None:
        # Without a seed, OpenAI's API samples afresh each time; so does this server.
        req.config = type(req.config)(**dict(req.config.to_dict(), seed=secrets.randbits(32)))
      job = self._job(req)
      self.engine.submit(job)
    except APIError as e:
      return error_response(e)
    except ClientDisconnect:  # nobody is left to read the answer
      return error_response(APIError(400, "The client disconnected while sending the body.",
                                     code="client_disconnected"))
    rid = protocol.new_id(kind)
    if req.stream:
      include_usage = bool((stream_options or {}).get("include_usage"))
      # The headers wait for the job's first event, so a request that never starts (turned
      # away at shutdown, say) still gets its error status rather than 200 and an error event.
      first = await job.events.get()
      if first[0] == "error":
        job.cancelled = True
        return error_response(first[1])
      return StreamingResponse(self._events(job, rid, include_usage, first),
                               media_type="text/event-stream",
                               headers={"Cache-Control": "no-cache"})
    kind_, payload = await job.events.get()
    while kind_ == "text":  # not sent for non-streamed jobs; skipped defensively
      kind_, payload = await job.events.get()
    if kind_ == "error":
      return error_response(payload)
    return JSONResponse(protocol.completion_body(
        kind, rid, self.model_id, self._choices(payload), self._usage(job, payload)))

  def _job(self, req: protocol.GenerationRequest) -> Job:
    writer, limits = self.writer, self.limits
    encoded = [writer.encode_prompt(p) for p in req.prompts]
    positions = writer.sampler.max_sequence()
    longest = max(len(e) for e in encoded)
    prompt_cap = min(limits.max_prompt_tokens, positions - 1)
    if longest > prompt_cap:
      raise APIError(422, f"The prompt is {longest} tokens; at most {prompt_cap} are accepted.",
                     param="prompt" if req.kind == "completion" else "messages",
                     code="context_length_exceeded")
    if req.max_tokens is None:
      max_new = max(1, min(limits.max_tokens, positions - longest))
    else:
      max_new = req.max_tokens
      if longest + max_new > positions:
        raise APIError(422, f"The prompt ({longest} tokens) plus max_tokens ({max_new}) exceeds "
                       f"the model's {positions} positions; lower max_tokens.",
                       param="max_tokens", code="context_length_exceeded")
    if req.config.min_new_tokens > max_new:
      raise APIError(422, f"'min_tokens' ({req.config.min_new_tokens}) exceeds the "
                     f"{max_new} tokens this request can have.", param="min_tokens",
                     code="out_of_range")
    return Job(request=req, encoded=encoded, max_new=max_new, loop=asyncio.get_running_loop(),
               events=asyncio.Queue())

  @staticmethod
  def _choices(stories) -> list[dict]:
    return [{"index": i, "text": s.text, "finish_reason": s.finish_reason}
            for i, s in enumerate(stories)]

  @staticmethod
  def _usage(job: Job, stories) -> dict[str, int]:
    prompt_tokens = sum(len(e) for e in job.encoded) * job.request.n
    return protocol.usage(prompt_tokens, sum(s.completion_tokens for s in stories))

  async def _events(self, job: Job, rid: str, include_usage: bool, first: tuple):
    kind = job.request.kind
    pending = [first]

    def sse(obj) -> str:
      return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    try:
      if kind == "chat":
        for i in range(job.rows):
          yield sse(protocol.chunk_body(kind, rid, self.model_id, i, None, None, first=True))
      while True:
        event, *payload = pending.pop() if pending else await job.events.get()
        if event == "text":
          index, piece = payload
          yield sse(protocol.chunk_body(kind, rid, self.model_id, index, piece, None))
        elif event == "error":
          yield sse(payload[0].body())
          return
        else:
          stories = payload[0]
          for i, s in enumerate(stories):
            yield sse(protocol.chunk_body(kind, rid, self.model_id, i, None, s.finish_reason))
          if include_usage:
            yield sse({"id": rid, "object": "text_completion" if kind == "completion"
                       else "chat.completion.chunk", "created": int(time.time()),
                       "model": self.model_id, "choices": [],
                       "usage": self._usage(job, stories)})
          yield "data: [DONE]\n\n"
          return
    finally:
      job.cancelled = True  # finished, or the client went away: nothing more to stream


async def _http_error(request: Request, exc: HTTPException):
  del request
  if exc.status_code == 404:
    return error_response(APIError(404, "No such endpoint; this server has GET /v1/models, "
                                   "POST /v1/completions and POST /v1/chat/completions.",
                                   code="not_found"))
  return error_response(APIError(exc.status_code, str(exc.detail), code="http_error"))


async def _internal_error(request: Request, exc: Exception):
  """Anything unexpected still answers in OpenAI's error JSON (the traceback goes to the log)."""
  logging.error("Unexpected error on %s %s: %r", request.method, request.url.path, exc)
  return error_response(APIError(500, "The server hit an unexpected error; the request was "
                                 "not completed.", code="internal_error"))


def create_app(engine: Engine, *, model_id: str, limits: Limits | None = None) -> Starlette:
  """The ASGI app over a started (or to-be-started) engine."""
  service = Service(engine, model_id=model_id, limits=limits or Limits())
  routes = [
      Route("/v1/models", service.list_models, methods=["GET"]),
      Route("/v1/models/{model:path}", service.get_model, methods=["GET"]),
      Route("/v1/completions", service.completions, methods=["POST"]),
      Route("/v1/chat/completions", service.chat_completions, methods=["POST"]),
  ]
  app = Starlette(routes=routes, exception_handlers={HTTPException: _http_error,
                                                     Exception: _internal_error})
  app.state.service = service
  return app
