"""Running the server: load a workdir, warm the compiler, bind, serve until SIGTERM / SIGINT.

Shutdown on SIGTERM (or Ctrl-C): the listening socket closes, queued requests get 503 at once,
requests being decoded finish if they can within `grace_s` seconds and are otherwise ended with a
503 error (a streamed one gets an error event), and the process exits 0.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import pathlib
import signal
import socket
import sys
import threading
from typing import TextIO

import uvicorn

from tinystories_jax import sampling
from tinystories_jax.sampling.config import SamplerConfig, SamplerError
from tinystories_jax.serving.app import create_app
from tinystories_jax.serving.engine import Engine
from tinystories_jax.serving.protocol import Limits


@dataclasses.dataclass
class ServeOptions:
  """What `serve` was asked for (flags, parsed)."""
  workdir: str
  host: str = "127.0.0.1"
  port: int = 8000
  model_name: str | None = None  # default: the workdir's directory name
  step: int | None = None
  dtype: str = "auto"
  matmul_dtype: str | None = None  # Sampler(matmul_dtype=...)
  max_batch: int = 32
  max_queue: int = 64
  grace_s: float = 30.0
  warmup: bool = True
  limits: Limits = dataclasses.field(default_factory=Limits)


class _Server(uvicorn.Server):
  """uvicorn, with the engine told about the signal before connections are drained."""

  def __init__(self, config: uvicorn.Config, engine: Engine, grace_s: float):
    super().__init__(config)
    self._engine = engine
    self._grace_s = grace_s

  def handle_exit(self, sig, frame) -> None:
    self._engine.begin_shutdown(self._grace_s)
    super().handle_exit(sig, frame)

  @contextlib.contextmanager
  def capture_signals(self):
    # uvicorn re-raises the signal once it has shut down, which kills the process before the
    # engine is joined; a signal that asked for a clean stop should end in exit status 0.
    if threading.current_thread() is not threading.main_thread():
      yield
      return
    handled = (signal.SIGINT, signal.SIGTERM)
    original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
    try:
      yield
    finally:
      for sig, handler in original.items():
        signal.signal(sig, handler)


def _is_loopback(host: str) -> bool:
  if host == "localhost":
    return True
  try:
    return ipaddress.ip_address(host).is_loopback
  except ValueError:
    return False


def bind(host: str, port: int) -> socket.socket:
  """A listening socket (port 0 picks a free one)."""
  family = socket.AF_INET6 if ":" in host else socket.AF_INET
  sock = socket.socket(family, socket.SOCK_STREAM)
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  try:
    sock.bind((host, port))
  except OSError as e:
    sock.close()
    raise SamplerError(f"cannot listen on {host}:{port} ({e.strerror}); choose another --port "
                       "or --host.") from None
  sock.listen(128)
  sock.set_inheritable(True)
  return sock


def serve(opts: ServeOptions, out: TextIO = sys.stdout) -> None:
  """Serves the workdir until SIGTERM or SIGINT.

  Raises:
    SamplerError: an unusable workdir, option or address.
  """
  if opts.max_batch < 1 or opts.max_queue < 0 or opts.grace_s < 0:
    raise SamplerError("--max_batch must be at least 1, --max_queue and --grace_s at least 0.")
  loaded = sampling.load(opts.workdir, step=opts.step, dtype=opts.dtype)
  writer = sampling.StoryWriter(loaded, matmul_dtype=opts.matmul_dtype)
  model_id = opts.model_name or pathlib.Path(opts.workdir).absolute().name
  if opts.warmup:  # compile the batch-of-one shapes before the first client waits for them
    writer.complete(["Once upon a time"], SamplerConfig(max_new_tokens=2))
  engine = Engine(writer, max_batch=opts.max_batch, max_queue=opts.max_queue)
  app = create_app(engine, model_id=model_id, limits=opts.limits)
  sock = bind(opts.host, opts.port)
  host, port = sock.getsockname()[:2]
  if not _is_loopback(opts.host):
    print(f"warning: listening on {opts.host}, reachable from other machines; this server has "
          "no authentication.", file=out)
  config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=opts.grace_s + 5,
                          lifespan="off")
  server = _Server(config, engine, opts.grace_s)
  engine.start()
  print(f"serving {model_id} ({loaded.name}) at http://{host}:{port}/v1", file=out, flush=True)
  try:
    server.run(sockets=[sock])
  finally:
    engine.begin_shutdown(0.0)
    engine.join(timeout=opts.grace_s + 10)
    sock.close()
  print("server stopped", file=out, flush=True)
