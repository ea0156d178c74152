"""The shared chat client against the loopback server: retries, stops, fallbacks, secrecy."""

import asyncio

import pytest

from tinystories_jax.grading import client as client_lib
from tinystories_jax.grading.client import (AuthStop, ChatClient, ChatError, ClientConfig,
                                            UnusableAnswer, retry_after_s, run_bounded)

from openai_server import Reply

MESSAGES = [{"role": "user", "content": "Hello there, teacher."}]


def make_client(server, **overrides):
  settings = dict(model="grader", base_url=server.base_url, backoff_initial_s=0.01,
                  backoff_max_s=0.05, max_retries=3, timeout_s=5.0)
  settings.update(overrides)
  return ChatClient(ClientConfig(**settings))


def chat(client, messages=MESSAGES, **kwargs):
  async def go():
    try:
      return await client.chat(messages, **kwargs)
    finally:
      await client.close()
  return asyncio.run(go())


def scripted(fake, replies):
  """Makes the server answer with `replies[attempt - 1]` (the last one repeats)."""
  fake.chat_handler = lambda body, attempt: replies[min(attempt, len(replies)) - 1]


def test_plain_answer_and_usage(server, fake):
  scripted(fake, [Reply(text="All good here.")])
  reply = chat(make_client(server))
  assert reply.text == "All good here."
  assert reply.attempts == 1
  assert reply.usage.completion_tokens == 3 and reply.usage.requests == 1


@pytest.mark.parametrize("first", [
    Reply(status=429, error="slow down", headers={"retry-after": "0.05"}),
    Reply(status=500, error="boom"),
    Reply(status=503, error="overloaded"),
    Reply(text="late", delay_s=2.0),
])
def test_transient_failures_are_retried(server, fake, first):
  scripted(fake, [first, Reply(text="Second time lucky.")])
  reply = chat(make_client(server, timeout_s=0.5))
  assert reply.text == "Second time lucky."
  assert reply.attempts == 2
  assert fake.stats["requests"] == 2


def test_unusable_answers_are_asked_again_and_all_kept(server, fake):
  scripted(fake, [Reply(text="nonsense"), Reply(text="42")])

  def parse(text):
    if not text.isdigit():
      raise UnusableAnswer("not a number")
    return int(text)

  reply = chat(make_client(server), parse=parse)
  assert reply.parsed == 42
  assert reply.raw_answers == ["nonsense", "42"]


def test_gives_up_with_the_last_reason(server, fake):
  scripted(fake, [Reply(status=500, error="still broken")])
  with pytest.raises(ChatError, match="gave up after 3 attempts; last: HTTP 500: still broken"):
    chat(make_client(server, max_retries=2))
  assert fake.stats["requests"] == 3


def test_bad_request_is_not_retried(server, fake):
  scripted(fake, [Reply(status=404, error="no such model")])
  with pytest.raises(ChatError, match="HTTP 404"):
    chat(make_client(server))
  assert fake.stats["requests"] == 1


def test_repeated_401_stops_everyone_without_hammering(server, fake):
  fake.api_key = "right-key"
  client = make_client(server, max_auth_failures=3, max_retries=10, concurrency=4)

  async def many():
    try:
      await asyncio.gather(*[client.chat(MESSAGES) for _ in range(40)])
    finally:
      await client.close()

  with pytest.raises(AuthStop, match="refused our credentials 3 times"):
    asyncio.run(many())
  # At most the stopping threshold plus what was already in flight, never 40 x 11.
  assert fake.stats["status_401"] <= 3 + 4


def test_the_key_never_appears_in_errors(server, fake, monkeypatch):
  monkeypatch.setenv("TEST_GRADER_KEY", "sk-very-secret-123")
  fake.api_key = "another-key"
  client = make_client(server, api_key_env="TEST_GRADER_KEY", max_auth_failures=1)
  with pytest.raises(AuthStop) as info:
    chat(client)
  assert "sk-very-secret-123" not in str(info.value)
  assert "[redacted key]" in str(info.value)  # The server echoed it; we scrubbed it.


def test_a_short_placeholder_key_does_not_garble_messages():
  message = "The prompt (238 tokens) plus max_tokens (500) exceeds the model's 512 positions."
  # Local servers accept any key, and "x" or "EMPTY" are common choices: only a whole-token
  # occurrence of the key is a leak.
  assert client_lib.redact_key(message, "x") == message
  assert client_lib.redact_key("key x was refused", "x") == "key [redacted key] was refused"
  assert client_lib.redact_key("bad key 'sk-a1.b2' given", "sk-a1.b2") == (
      "bad key '[redacted key]' given")
  assert client_lib.redact_key("Bearer sk-abc123xyz", "sk-abc123xyz") == "Bearer [redacted key]"
  assert client_lib.redact_key(message, "") == message


def test_structured_output_falls_back_to_free_text(server, fake):
  fake.structured_output = False
  scripted(fake, [Reply(text="Grammar: 8")])
  client = make_client(server)
  reply = chat(client, response_format={"type": "json_schema", "json_schema": {}})
  assert reply.text == "Grammar: 8"
  assert client.structured_output_supported is False
  assert fake.stats["status_400"] == 1


def test_missing_key_without_base_url_is_a_clear_error(monkeypatch):
  monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
  with pytest.raises(client_lib.ConfigError, match="set the NO_SUCH_KEY_VAR"):
    ChatClient(ClientConfig(api_key_env="NO_SUCH_KEY_VAR"))


def test_bad_settings_are_clear_errors():
  with pytest.raises(client_lib.ConfigError, match="concurrency"):
    ClientConfig(concurrency=0)


def test_retry_after_forms():
  assert retry_after_s({"retry-after": "2"}) == 2.0
  assert retry_after_s({"retry-after-ms": "250"}) == 0.25
  assert retry_after_s({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) == 0.0
  assert retry_after_s({}) is None


def test_run_bounded_respects_the_bound(server, fake):
  fake.latency_s = 0.02
  client = make_client(server, concurrency=64)
  seen = []

  async def handle(i):
    seen.append((await client.chat(MESSAGES)).text)

  async def go():
    try:
      await run_bounded(range(30), handle, concurrency=5)
    finally:
      await client.close()

  asyncio.run(go())
  assert len(seen) == 30
  assert fake.stats["max_in_flight"] <= 5


def test_retry_after_unusable_answer_samples_at_the_retry_temperature(server, fake):
  seen = []

  def handler(body, attempt):
    seen.append(body.get("temperature"))
    return Reply(text="bad" if attempt == 1 else "good")

  def parse(text):
    if text != "good":
      raise UnusableAnswer("bad")
    return text

  fake.chat_handler = handler
  chat(make_client(server), parse=parse, temperature=0.0, retry_temperature=0.7)
  assert seen == [0.0, 0.7]


def test_an_unreachable_endpoint_stops_the_run_quickly():
  import socket  # pylint: disable=g-import-not-at-top
  with socket.socket() as probe:  # A port nobody listens on.
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
  client = ChatClient(ClientConfig(model="m", base_url=f"http://127.0.0.1:{port}/v1",
                                   backoff_initial_s=0.01, max_retries=50, concurrency=4,
                                   max_connection_failures=6))

  async def many():
    try:
      await asyncio.gather(*[client.chat(MESSAGES) for _ in range(30)])
    finally:
      await client.close()

  with pytest.raises(client_lib.Unreachable, match="Could not reach .* 6 times in a row"):
    asyncio.run(many())
