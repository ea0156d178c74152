"""The OpenAI wire format: checking request bodies, shaping responses, errors as OpenAI sends them.

Status codes: 400 a body that is not a JSON object, a missing field or a setting this server does
not support; 404 an unknown path or model; 413 a body over the size cap; 422 a field of the wrong
type or out of range, or a prompt over the length cap; 429 the queue is full; 503 the server is
shutting down. Every error body is `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from typing import Any

from tinystories_jax.sampling.config import SamplerConfig, SamplerError


class APIError(Exception):
  """An error to send as OpenAI's error JSON with `status`."""

  def __init__(self, status: int, message: str, *, param: str | None = None,
               code: str | None = None):
    super().__init__(message)
    self.status = status
    self.message = message
    self.param = param
    self.code = code

  def body(self) -> dict[str, Any]:
    kind = {400: "invalid_request_error", 404: "invalid_request_error",
            405: "invalid_request_error", 413: "invalid_request_error",
            422: "invalid_request_error",
            429: "rate_limit_error", 503: "server_error"}.get(self.status, "server_error")
    return {"error": {"message": self.message, "type": kind, "param": self.param,
                      "code": self.code}}


@dataclasses.dataclass(frozen=True)
class Limits:
  """Caps on what one request may ask for."""
  max_body_bytes: int = 1 << 20
  max_prompt_tokens: int = 1024  # also bounded by the model's positions
  max_tokens: int = 512
  max_n: int = 16
  max_prompts: int = 64
  max_stop: int = 4


@dataclasses.dataclass
class GenerationRequest:
  """A checked completions or chat request."""
  kind: str  # "completion" or "chat"
  prompts: list[str]
  n: int
  max_tokens: int | None  # None: as much as the model's context leaves, up to the cap
  config: SamplerConfig  # max_new_tokens is filled in by the server
  stream: bool
  model: str | None


# Settings OpenAI defines that this server cannot honour: asking for them (with a value other
# than the neutral one) is a 400 rather than a silent difference.
_UNSUPPORTED = {"logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False),
                "suffix": (None, ""), "best_of": (None, 1), "presence_penalty": (None, 0, 0.0),
                "frequency_penalty": (None, 0, 0.0), "logit_bias": (None, {}),
                "tools": (None, []), "functions": (None, []), "response_format": (None,)}


def _type_error(param: str, want: str, got: Any) -> APIError:
  return APIError(422, f"'{param}' must be {want}, got {type(got).__name__} {got!r:.60}.",
                  param=param, code="invalid_type")


def _number(body, param, lo, hi, default):
  value = body.get(param)
  if value is None:
    return default
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise _type_error(param, "a number", value)
  if not lo <= value <= hi:
    raise APIError(422, f"'{param}' must be between {lo} and {hi}, got {value}.", param=param,
                   code="out_of_range")
  return value


def _integer(body, param, lo, hi, default):
  value = body.get(param)
  if value is None:
    return default
  if isinstance(value, bool) or not isinstance(value, int):
    raise _type_error(param, "an integer", value)
  if not lo <= value <= hi:
    raise APIError(422, f"'{param}' must be an integer from {lo} to {hi}, got {value}.",
                   param=param, code="out_of_range")
  return value


def _text_of(content: Any, param: str) -> str:
  if isinstance(content, str):
    return content
  if isinstance(content, list):  # content parts: [{"type": "text", "text": ...}, ...]
    parts = []
    for part in content:
      if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(
          part.get("text"), str):
        raise APIError(400, f"'{param}' may hold only text parts; this server reads stories, "
                       "not images or audio.", param=param, code="unsupported_content")
      parts.append(part["text"])
    return "".join(parts)
  raise _type_error(param, "a string or a list of text parts", content)


def parse_generation(body: Any, kind: str, limits: Limits) -> GenerationRequest:
  """Checks a /v1/completions (`kind="completion"`) or /v1/chat/completions body.

  Raises:
    APIError: with the status the module docstring lists.
  """
  if not isinstance(body, dict):
    raise APIError(400, "The request body must be a JSON object.", code="invalid_body")
  for name, neutral in _UNSUPPORTED.items():
    if name in body and body[name] not in neutral:
      raise APIError(400, f"'{name}' is not supported by this server; leave it out.", param=name,
                     code="unsupported_parameter")
  model = body.get("model")
  if model is not None and not isinstance(model, str):
    raise _type_error("model", "a string", model)
  if kind == "completion":
    if "prompt" not in body:
      raise APIError(400, "'prompt' is required: the beginning of the story to continue.",
                     param="prompt", code="missing_required_parameter")
    prompt = body["prompt"]
    if isinstance(prompt, str):
      prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
      prompts = list(prompt)
    else:
      raise _type_error("prompt", "a string or a non-empty list of strings", prompt)
    if len(prompts) > limits.max_prompts:
      raise APIError(422, f"'prompt' lists {len(prompts)} prompts; at most {limits.max_prompts} "
                     "per request.", param="prompt", code="too_many_prompts")
    max_tokens = body.get("max_tokens")
    max_param = "max_tokens"
  else:
    messages = body.get("messages")
    if messages is None:
      raise APIError(400, "'messages' is required; its last user message is the story "
                     "beginning.", param="messages", code="missing_required_parameter")
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
      raise _type_error("messages", "a list of message objects", messages)
    users = [m for m in messages if m.get("role") == "user"]
    if not users:
      raise APIError(400, "'messages' has no user message; send the story beginning as the "
                     "last user message.", param="messages", code="missing_user_message")
    prompts = [_text_of(users[-1].get("content"), "messages")]
    max_param = "max_completion_tokens" if body.get("max_completion_tokens") is not None \
        else "max_tokens"
    max_tokens = body.get(max_param)
  if max_tokens is not None:
    max_tokens = _integer(body, max_param, 1, limits.max_tokens, None)
  n = _integer(body, "n", 1, limits.max_n, 1)
  temperature = _number(body, "temperature", 0, 2, None)
  top_p = _number(body, "top_p", 1e-9, 1, None)
  top_k = _integer(body, "top_k", 0, 1 << 20, None)  # an extension OpenAI's API lacks
  min_tokens = _integer(body, "min_tokens", 0, limits.max_tokens, None)  # extension too
  seed = body.get("seed")
  if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
    raise _type_error("seed", "an integer", seed)
  stop = body.get("stop")
  if stop is None:
    stops: tuple[str, ...] = ()
  elif isinstance(stop, str):
    stops = (stop,)
  elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
    stops = tuple(stop)
  else:
    raise _type_error("stop", "a string or a list of strings", stop)
  if len(stops) > limits.max_stop or any(not s for s in stops):
    raise APIError(422, f"'stop' takes 1 to {limits.max_stop} non-empty strings.", param="stop",
                   code="invalid_stop")
  stream = body.get("stream", False)
  if not isinstance(stream, bool):
    raise _type_error("stream", "a boolean", stream)
  settings = {k: v for k, v in dict(temperature=temperature, top_p=top_p, top_k=top_k,
                                    min_new_tokens=min_tokens, stop=stops).items()
              if v is not None}
  if seed is not None:
    settings["seed"] = seed % (1 << 32)
  try:
    # max_new_tokens is a placeholder here: the server sets it per request once prompts are
    # encoded. The cap keeps min_tokens checkable now.
    config = SamplerConfig(max_new_tokens=limits.max_tokens, **settings)
  except SamplerError as e:
    raise APIError(422, str(e), code="invalid_value") from None
  if max_tokens is not None and config.min_new_tokens > max_tokens:
    raise APIError(422, f"'min_tokens' ({config.min_new_tokens}) exceeds '{max_param}' "
                   f"({max_tokens}).", param="min_tokens", code="out_of_range")
  return GenerationRequest(kind=kind, prompts=prompts, n=n, max_tokens=max_tokens, config=config,
                           stream=stream, model=model)


def new_id(kind: str) -> str:
  return ("cmpl-" if kind == "completion" else "chatcmpl-") + uuid.uuid4().hex[:24]


def completion_body(kind: str, rid: str, model: str, choices: list[dict], usage: dict
                    ) -> dict[str, Any]:
  """A whole (non-streamed) response. `choices` hold index, text and finish_reason."""
  if kind == "completion":
    shaped = [{"index": c["index"], "text": c["text"], "logprobs": None,
               "finish_reason": c["finish_reason"]} for c in choices]
    obj = "text_completion"
  else:
    shaped = [{"index": c["index"], "message": {"role": "assistant", "content": c["text"]},
               "logprobs": None, "finish_reason": c["finish_reason"]} for c in choices]
    obj = "chat.completion"
  return {"id": rid, "object": obj, "created": int(time.time()), "model": model,
          "choices": shaped, "usage": usage}


def chunk_body(kind: str, rid: str, model: str, index: int, text: str | None,
               finish_reason: str | None, *, first: bool = False) -> dict[str, Any]:
  """One server-sent event of a streamed response."""
  if kind == "completion":
    choice = {"index": index, "text": text or "", "logprobs": None,
              "finish_reason": finish_reason}
    obj = "text_completion"
  else:
    delta: dict[str, Any] = {}
    if first:
      delta["role"] = "assistant"
    if text:
      delta["content"] = text
    choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    obj = "chat.completion.chunk"
  return {"id": rid, "object": obj, "created": int(time.time()), "model": model,
          "choices": [choice]}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
  return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
          "total_tokens": prompt_tokens + completion_tokens}
