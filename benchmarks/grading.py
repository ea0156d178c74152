r"""Grading throughput against the loopback OpenAI-compatible server.

  python benchmarks/grading.py [--items=1000 --concurrency=32 --latency=0.05 --workers=1]

Starts `tests/openai_server.py` in its own process (answering every request after --latency
seconds), grades --items completions with the two-turn rubric (two requests per item), and
prints one JSON line: grades/s, requests/s, and the ideal the latency allows
(concurrency / (2 x latency) grades/s, since the second turn waits for the first).
"""

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from tinystories_jax.grading import client as client_lib  # pylint: disable=g-import-not-at-top
from tinystories_jax.grading import evalsets  # pylint: disable=g-import-not-at-top
from tinystories_jax.grading import grader  # pylint: disable=g-import-not-at-top
from tinystories_jax.grading import journal as journal_lib  # pylint: disable=g-import-not-at-top
from tinystories_jax.grading import report as report_lib  # pylint: disable=g-import-not-at-top
from tinystories_jax.grading import rubric as rubric_lib  # pylint: disable=g-import-not-at-top


def _self_and_children_cpu_s() -> float:
  """CPU seconds of this process and its finished children (the grading workers)."""
  own, children = os.times(), resource.getrusage(resource.RUSAGE_CHILDREN)
  # RUSAGE_CHILDREN also holds the server once it exits; it is still running here.
  return own.user + own.system + children.ru_utime + children.ru_stime


def _all_keys(tmp: str) -> set[str]:
  with open(os.path.join(tmp, "out", "grades.jsonl")) as f:
    return {json.loads(line)["key"] for line in f}


def _process_cpu_s(pid: int) -> float:
  """User + system CPU seconds of another process (Linux /proc)."""
  with open(f"/proc/{pid}/stat") as f:
    fields = f.read().rsplit(")", 1)[1].split()
  return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--items", type=int, default=1000)
  parser.add_argument("--concurrency", type=int, default=32)
  parser.add_argument("--latency", type=float, default=0.05)
  parser.add_argument("--workers", type=int, default=1,
                      help="grading processes (see tinystories_jax/grading/workers.py)")
  args = parser.parse_args()
  client_lib.quiet_http_logs()
  server = subprocess.Popen(
      [sys.executable, os.path.join(REPO_ROOT, "tests", "openai_server.py"),
       f"--latency={args.latency}"], stdout=subprocess.PIPE, text=True)
  try:
    port = int(server.stdout.readline().split()[1])
    with tempfile.TemporaryDirectory() as tmp:
      beginnings = evalsets.load_eval_set("stories")
      path = os.path.join(tmp, "completions.jsonl")
      with open(path, "w") as f:
        for i in range(args.items):
          b = beginnings[i % len(beginnings)]
          f.write(json.dumps({"id": f"c{i}", "prompt": b["prompt"], "model": "bench",
                              "completion": " she smiled and they played all day. The end."})
                  + "\n")
      config = grader.GradeConfig(
          completions=(path,), output_dir=os.path.join(tmp, "out"),
          client=client_lib.ClientConfig(model="gpt-4o", base_url=f"http://127.0.0.1:{port}/v1",
                                         concurrency=args.concurrency),
          progress=False, workers=args.workers)
      start = time.perf_counter()
      cpu_start = _self_and_children_cpu_s()
      server_cpu_start = _process_cpu_s(server.pid)
      summary = grader.grade(config)
      total = time.perf_counter() - start
      client_cpu = _self_and_children_cpu_s() - cpu_start
      server_cpu = _process_cpu_s(server.pid) - server_cpu_start
      # The report (bootstrap, charts) is part of `grade`; time it again alone to take it out.
      report_cpu_start = time.process_time()
      report_lib.write_report(
          grader.latest_rows(list(journal_lib.read_rows(
              os.path.join(tmp, "out", "grades.jsonl"))), _all_keys(tmp)),
          output_dir=os.path.join(tmp, "out"), rubric=rubric_lib.STORY,
          grader_model="gpt-4o", prices={}, expected_items=args.items)
      client_cpu -= time.process_time() - report_cpu_start
      with open(os.path.join(tmp, "out", "grades.jsonl")) as f:
        stamps = sorted(json.loads(line)["graded_at"] for line in f)
  finally:
    server.terminate()
    server.wait()
  # Grading phase: from the first request to the last result (the report is timed apart).
  grading_s = stamps[-1] - stamps[0] + 2 * args.latency
  ideal = args.concurrency / (2 * args.latency)
  result = {
      "benchmark": "grading", "items": args.items, "concurrency": args.concurrency,
      "latency_s": args.latency, "workers": args.workers, "graded": summary["graded"], "failed": summary["failed"],
      "grades_per_s": round(args.items / grading_s, 1),
      "requests_per_s": round(summary["usage"]["requests"] / grading_s, 1),
      "ideal_grades_per_s": ideal,
      "share_of_ideal": round(args.items / grading_s / ideal, 3),
      "total_with_report_s": round(total, 2),
      # CPU per request, nearly load-independent: grading processes can never exceed
      # workers x 1000 / (2 x client_ms) grades/s, however idle the machine.
      "client_cpu_ms_per_request": round(1000 * client_cpu / summary["usage"]["requests"], 3),
      "client_cpu_bound_grades_per_s": round(
          args.workers * summary["usage"]["requests"] / client_cpu / 2, 1),
      "server_cpu_ms_per_request": round(1000 * server_cpu / summary["usage"]["requests"], 3),
      "load_average_1m": round(os.getloadavg()[0], 2),
      "cpus": os.cpu_count(), "python": platform.python_version(),
      "date": time.strftime("%Y-%m-%d"),
  }
  print(json.dumps(result))


if __name__ == "__main__":
  main()
