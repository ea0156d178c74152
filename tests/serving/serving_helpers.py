"""A live uvicorn server on loopback for the server tests."""

import socket
import threading
import time


class LiveServer:
  """uvicorn serving an app on a free loopback port, in a thread of the test process."""

  def __init__(self, app):
    import uvicorn  # noqa: PLC0415

    self.sock = socket.socket()
    self.sock.bind(("127.0.0.1", 0))
    self.sock.listen(64)
    self.port = self.sock.getsockname()[1]
    self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                   daemon=True)

  @property
  def base_url(self) -> str:
    return f"http://127.0.0.1:{self.port}/v1"

  def __enter__(self):
    self.thread.start()
    deadline = time.monotonic() + 30
    while not self.server.started:
      if time.monotonic() > deadline:
        raise RuntimeError("the test server did not start")
      time.sleep(0.02)
    return self

  def __exit__(self, *exc):
    self.server.should_exit = True
    self.thread.join(30)
    self.sock.close()
