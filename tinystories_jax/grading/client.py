"""The one client for OpenAI-compatible chat endpoints, shared by grading and datagen.

Every request goes through `ChatClient.chat`, which owns the policy the rest of the code relies on:
bounded concurrency, retries with exponential backoff and jitter on 429 (honouring Retry-After),
5xx, timeouts, dropped connections and answers the caller cannot use, and a hard stop after
repeated 401/403 so a bad key does not hammer the endpoint. The API key comes from the environment
only and is scrubbed from every message this module produces.
"""

from __future__ import annotations

import asyncio
import dataclasses
import email.utils
import logging as std_logging
import os
import random
import re
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar

import openai

T = TypeVar("T")

# Local servers (vLLM, our own `serve`) accept any key; the client library insists on one.
_PLACEHOLDER_KEY = "no-key-needed-for-local-servers"
# A server may ask for a long pause; beyond this we treat it as a failed attempt, not a sleep.
_MAX_RETRY_AFTER_S = 600.0


class ConfigError(ValueError):
  """A setting the user must change (missing key, bad flag); its text is the fix."""


class ChatError(Exception):
  """A request that failed for good; `str(error)` is the reason recorded with the item."""

  def __init__(self, reason: str, *, raw_answers=(), usage=None, attempts=0):
    super().__init__(reason)
    self.raw_answers = list(raw_answers)
    self.usage = usage or Usage()
    self.attempts = attempts


class StopRun(Exception):
  """Going on is pointless (the endpoint refuses us or cannot be reached); the run must stop.

  Items in flight are not recorded as failed: it is not their fault, and a rerun grades them.
  """


class AuthStop(StopRun):
  """The endpoint refused our credentials repeatedly."""


class Unreachable(StopRun):
  """The endpoint could not be reached many times in a row."""


class UnusableAnswer(ValueError):
  """Raised by a `parse` callback: the answer arrived but cannot be used, so ask again."""


@dataclasses.dataclass(frozen=True)
class ClientConfig:
  """How to reach the endpoint and how hard to try.

  Attributes:
    model: model name sent with every request.
    base_url: OpenAI-compatible base URL ending in `/v1`; None means api.openai.com.
    api_key_env: environment variable holding the key.
    concurrency: most requests in flight at once.
    max_retries: retries after the first attempt of one request.
    timeout_s: per-request timeout.
    backoff_initial_s: first backoff; doubles each retry, with jitter.
    backoff_max_s: cap on one backoff.
    max_auth_failures: consecutive 401/403 answers that stop the run.
    max_connection_failures: consecutive failed connections (no answer at all, timeouts
      excluded) that stop the run.
  """
  model: str = "gpt-4o"
  base_url: str | None = None
  api_key_env: str = "OPENAI_API_KEY"
  concurrency: int = 16
  max_retries: int = 6
  timeout_s: float = 120.0
  backoff_initial_s: float = 1.0
  backoff_max_s: float = 60.0
  max_auth_failures: int = 3
  max_connection_failures: int = 20

  def __post_init__(self):
    if self.concurrency < 1:
      raise ConfigError(f"concurrency must be at least 1, got {self.concurrency}.")
    if self.max_retries < 0:
      raise ConfigError(f"max_retries must be 0 or more, got {self.max_retries}.")
    if self.timeout_s <= 0:
      raise ConfigError(f"timeout must be positive, got {self.timeout_s}.")
    if self.max_connection_failures < 1:
      raise ConfigError(
          f"max_connection_failures must be at least 1, got {self.max_connection_failures}.")
    if self.max_auth_failures < 1:
      raise ConfigError(f"max_auth_failures must be at least 1, got {self.max_auth_failures}.")


@dataclasses.dataclass
class Usage:
  """Tokens and requests spent, failed attempts included (they are billed too)."""
  prompt_tokens: int = 0
  completion_tokens: int = 0
  requests: int = 0

  def add(self, other: Usage) -> None:
    self.prompt_tokens += other.prompt_tokens
    self.completion_tokens += other.completion_tokens
    self.requests += other.requests

  def as_dict(self) -> dict[str, int]:
    return dataclasses.asdict(self)


@dataclasses.dataclass
class ChatReply:
  """A usable answer. `raw_answers` holds every text received, unusable ones first."""
  text: str
  parsed: Any
  usage: Usage
  latency_s: float
  attempts: int
  raw_answers: list[str]


def quiet_http_logs() -> None:
  """Silences the per-request INFO lines of the HTTP stack (hundreds a second when grading)."""
  for name in ("httpx", "httpx2", "httpcore", "openai"):
    std_logging.getLogger(name).setLevel(std_logging.WARNING)


def resolve_api_key(config: ClientConfig) -> str:
  """The key from the environment; a placeholder for local servers that need none."""
  key = os.environ.get(config.api_key_env, "").strip()
  if key:
    return key
  if config.base_url:
    return _PLACEHOLDER_KEY
  raise ConfigError(
      f"No API key: set the {config.api_key_env} environment variable, or pass --base_url for a "
      "local OpenAI-compatible server.")


def redact_key(text: str, key: str) -> str:
  """`text` with every occurrence of `key` that stands as a whole token replaced.

  A key counts as written where no letter or digit touches it on either side, so a short
  placeholder key such as "x" or "EMPTY" (which local servers accept) does not garble the words
  it happens to be part of ("max_tokens"), while a real key quoted in an error is still removed.
  """
  if not key or key == _PLACEHOLDER_KEY:
    return text
  return re.sub(rf"(?<![A-Za-z0-9]){re.escape(key)}(?![A-Za-z0-9])", "[redacted key]", text)


def retry_after_s(headers) -> float | None:
  """Seconds the server asked us to wait (Retry-After-Ms, Retry-After seconds or HTTP date)."""
  if headers is None:
    return None
  for name, divisor in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
    value = headers.get(name)
    if value is None:
      continue
    try:
      return max(0.0, float(value) / divisor)
    except ValueError:
      pass
  value = headers.get("retry-after")
  if value:
    try:
      when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
      return None
    return max(0.0, when.timestamp() - time.time())
  return None


def _status_error_message(error: openai.APIStatusError) -> str:
  body = error.body
  if isinstance(body, dict):
    detail = body.get("error", body)
    if isinstance(detail, dict) and detail.get("message"):
      return str(detail["message"])
  return str(error.message)


class ChatClient:
  """Retrying, concurrency-bounded chat completions against one model.

  Args:
    config: endpoint, model and retry policy.
    seed: seeds the backoff jitter so runs are reproducible.
  """

  def __init__(self, config: ClientConfig, *, seed: int = 0):
    self.config = config
    self._key = resolve_api_key(config)
    self._client = openai.AsyncOpenAI(
        base_url=config.base_url, api_key=self._key, max_retries=0, timeout=config.timeout_s)
    self._semaphore = asyncio.Semaphore(config.concurrency)
    self._rng = random.Random(seed)
    self._auth_failures = 0
    self._connection_failures = 0
    self._stopped: StopRun | None = None
    # None: not known yet. Set False once the endpoint rejects `response_format`.
    self.structured_output_supported: bool | None = None

  async def close(self) -> None:
    await self._client.close()

  def redact(self, text: str) -> str:
    """`text` with the API key removed, for anything that is logged or written."""
    return redact_key(text, self._key)

  def _backoff_s(self, retry: int) -> float:
    cap = min(self.config.backoff_max_s, self.config.backoff_initial_s * 2.0**retry)
    # Jitter in [cap/2, cap]: spreads simultaneous retries without collapsing to zero wait.
    return cap * (0.5 + 0.5 * self._rng.random())

  async def _post(self, body: dict[str, Any]) -> Any:
    async with self._semaphore:
      if self._stopped:  # Checked again here: callers may have queued before the stop.
        raise type(self._stopped)(str(self._stopped))
      # `post` with cast_to=object returns the decoded JSON. The typed `chat.completions.create`
      # costs about twice the CPU per request (request transforms, pydantic models), which is
      # the bottleneck at hundreds of requests a second; errors map to the same exceptions.
      return await self._client.post("/chat/completions", body=body, cast_to=object)

  async def chat(
      self,
      messages: list[dict[str, str]],
      *,
      parse: Callable[[str], Any] | None = None,
      response_format: dict[str, Any] | None = None,
      max_tokens: int | None = None,
      temperature: float | None = None,
      retry_temperature: float | None = None,
      seed: int | None = None,
  ) -> ChatReply:
    """One chat completion, retried until usable.

    Args:
      messages: the conversation, OpenAI format.
      parse: turns the answer text into the caller's value; raises `UnusableAnswer` to retry.
      response_format: a JSON-schema response format, dropped if the endpoint rejects it.
      max_tokens: answer length cap.
      temperature: sampling temperature.
      retry_temperature: temperature for attempts after an unusable answer (a grader at
        temperature 0 would otherwise give the same unusable answer again).
      seed: sampling seed, for endpoints that honour it.

    Returns:
      The first usable reply.

    Raises:
      ChatError: retries exhausted or a request the endpoint will never accept.
      StopRun: too many consecutive 401/403 answers (AuthStop) or failed connections
        (Unreachable) in this client; every caller stops.
    """
    usage = Usage()
    raw_answers: list[str] = []
    reason = ""
    retries = 0
    attempts = 0
    while True:
      if self._stopped:
        raise type(self._stopped)(str(self._stopped))
      body: dict[str, Any] = {"model": self.config.model, "messages": messages}
      if max_tokens is not None:
        body["max_tokens"] = max_tokens
      if temperature is not None:
        body["temperature"] = temperature
      if retry_temperature is not None and raw_answers:
        body["temperature"] = retry_temperature
      if seed is not None:
        body["seed"] = seed
      if response_format is not None and self.structured_output_supported is not False:
        body["response_format"] = response_format
      attempts += 1
      delay = None
      start = time.perf_counter()
      try:
        data = await self._post(body)
        latency = time.perf_counter() - start
        usage.requests += 1
        text = read_answer(data, usage)
        self._auth_failures = 0
        self._connection_failures = 0
        raw_answers.append(text)
        parsed = parse(text) if parse is not None else text
        if "response_format" in body:
          self.structured_output_supported = True
        return ChatReply(text, parsed, usage, latency, attempts, raw_answers)
      except UnusableAnswer as e:
        reason = f"unusable answer: {e}"
      except openai.APITimeoutError:
        usage.requests += 1
        reason = f"timed out after {self.config.timeout_s:g} s"
      except openai.APIConnectionError as e:
        usage.requests += 1
        reason = f"connection failed: {self.redact(str(e))}"
        self._connection_failures += 1
        if self._connection_failures >= self.config.max_connection_failures:
          self._stopped = Unreachable(
              f"Could not reach {self.config.base_url or 'the OpenAI API'} "
              f"{self._connection_failures} times in a row ({reason}); check that the server "
              "is running and --base_url, then rerun to resume.")
          raise self._stopped from None
      except openai.APIStatusError as e:
        usage.requests += 1
        self._connection_failures = 0  # It answered, so it is reachable.
        status = e.status_code
        message = self.redact(_status_error_message(e))
        reason = f"HTTP {status}: {message}"
        if status in (401, 403):
          self._auth_failures += 1
          if self._auth_failures >= self.config.max_auth_failures:
            self._stopped = AuthStop(
                f"The endpoint refused our credentials {self._auth_failures} times in a row "
                f"(last: HTTP {status}: {message}); check {self.config.api_key_env} and "
                "--base_url.")
            raise self._stopped from None
        elif status == 429:
          delay = retry_after_s(e.response.headers if e.response is not None else None)
          if delay is not None and delay > _MAX_RETRY_AFTER_S:
            delay = None
        elif status == 400 and "response_format" in body and _mentions_response_format(message):
          # The endpoint does not do structured output: free-text parsing takes over, at once.
          self.structured_output_supported = False
          continue
        elif status < 500 and status not in (408, 409):
          raise ChatError(reason, raw_answers=raw_answers, usage=usage, attempts=attempts) from None
      if retries >= self.config.max_retries:
        raise ChatError(
            f"gave up after {attempts} attempts; last: {reason}",
            raw_answers=raw_answers, usage=usage, attempts=attempts)
      if delay is None:
        delay = self._backoff_s(retries)
      retries += 1
      await asyncio.sleep(delay)


def _mentions_response_format(message: str) -> bool:
  lowered = message.lower()
  return any(word in lowered for word in ("response_format", "json_schema", "structured"))


def read_answer(data: Any, usage: Usage) -> str:
  """The assistant's text from a decoded chat-completions body; counts its tokens."""
  if not isinstance(data, dict):
    raise UnusableAnswer("the endpoint did not answer with a JSON chat completion")
  counted = data.get("usage") or {}
  usage.prompt_tokens += int(counted.get("prompt_tokens") or 0)
  usage.completion_tokens += int(counted.get("completion_tokens") or 0)
  try:
    text = data["choices"][0]["message"]["content"]
  except (KeyError, IndexError, TypeError):
    raise UnusableAnswer("the reply has no choices[0].message.content") from None
  if not isinstance(text, str) or not text.strip():
    raise UnusableAnswer("the reply is empty")
  return text


def run_event_loop(main: Awaitable[T]) -> T:
  """Runs `main` on uvloop when it is installed (it measured a little less CPU per request)."""
  try:
    import uvloop  # pylint: disable=g-import-not-at-top
  except ImportError:
    return asyncio.run(main)
  return uvloop.run(main)


async def run_bounded(
    items: Iterable[T], handle: Callable[[T], Awaitable[None]], concurrency: int) -> None:
  """Runs `handle` over `items` with at most `concurrency` at once, pulling items lazily.

  Items are drawn one at a time as workers free up, so millions of items cost no memory up
  front. The first exception cancels the other workers and is re-raised.
  """
  iterator = iter(items)

  async def worker():
    for item in iterator:  # One shared iterator: the event loop makes this safe.
      await handle(item)

  tasks = [asyncio.ensure_future(worker()) for _ in range(concurrency)]
  try:
    await asyncio.gather(*tasks)
  finally:
    for task in tasks:
      task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
