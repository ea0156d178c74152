r"""Story generation throughput against the loopback OpenAI-compatible server.

  python benchmarks/datagen.py [--stories=1000 --concurrency=32 --latency=0.05]

Starts `tests/openai_server.py` in its own process (answering after --latency seconds), generates
--stories stories (one request each, plus the quality checks and the journal), and prints one JSON
line: stories/s against the ideal concurrency / latency.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from tinystories_jax.datagen import generator  # pylint: disable=g-import-not-at-top
from tinystories_jax.grading import client as client_lib  # pylint: disable=g-import-not-at-top


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--stories", type=int, default=1000)
  parser.add_argument("--concurrency", type=int, default=32)
  parser.add_argument("--latency", type=float, default=0.05)
  args = parser.parse_args()
  client_lib.quiet_http_logs()
  server = subprocess.Popen(
      [sys.executable, os.path.join(REPO_ROOT, "tests", "openai_server.py"),
       f"--latency={args.latency}"], stdout=subprocess.PIPE, text=True)
  try:
    port = int(server.stdout.readline().split()[1])
    with tempfile.TemporaryDirectory() as tmp:
      config = generator.GenerateConfig(
          num_stories=args.stories, output=os.path.join(tmp, "stories.jsonl"),
          client=client_lib.ClientConfig(model="gpt-4o-mini",
                                         base_url=f"http://127.0.0.1:{port}/v1",
                                         concurrency=args.concurrency),
          progress=False)
      start = time.perf_counter()
      cpu_start = time.process_time()
      stats = generator.generate(config)
      wall = time.perf_counter() - start
      cpu = time.process_time() - cpu_start
  finally:
    server.terminate()
    server.wait()
  ideal = args.concurrency / args.latency
  print(json.dumps({
      "benchmark": "datagen", "stories": stats["kept"], "attempts": stats["attempts"],
      "concurrency": args.concurrency, "latency_s": args.latency,
      "stories_per_s": round(stats["attempts"] / wall, 1), "ideal_per_s": ideal,
      "share_of_ideal": round(stats["attempts"] / wall / ideal, 3),
      "client_cpu_ms_per_story": round(1000 * cpu / stats["attempts"], 3),
      "load_average_1m": round(os.getloadavg()[0], 2), "cpus": os.cpu_count(),
      "date": time.strftime("%Y-%m-%d")}))


if __name__ == "__main__":
  main()
