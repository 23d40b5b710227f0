"""Starts the digits command as two local JAX processes many times in a row, under load, and
records how each start ended: the loop behind issue 27's start-up hang.

  nice -n 10 python -m benchmarks.two_process_starts --runs=50 --load=2 \
    --record=benchmarks/results/two_process_starts.md

Why: one clean-clone CI run hung at the start of a two-process run (both processes idle in futex
waits), while the rest of the suite ran beside it; 30 starts in a row on an idle machine all
passed. So each start here is short (two train steps of the small CNN, one eval, one
checkpoint), runs beside ``--load`` busy processes (nice'd, as the other half of a 2-core CI
box), and every process runs the launcher's watchdog (``--watchdog_seconds``): a hang ends with
every thread's stack in ``--logs``. A start that outlives ``--timeout`` gets ``SIGUSR1`` (stacks
without exit) and is then killed. Each start gets a fresh compilation cache by default (a clean
clone's first start: both processes compile and write the same entries at once).

The record (a Markdown table row per invocation) says how many starts, under what load, how
many ended how; the outputs of every failed start are kept under ``--logs``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from experiments import launch, watchdog

ROOT = Path(__file__).parent.parent
FLAGS = [
  "--config=experiments/configs/digits.py:local",
  "--config.num_train_steps=2",
  "--config.log_every_steps=1",
  "--config.run.checkpoint_every_steps=2",
  "--config.run.progress=false",
]
SPIN = "import os\nos.nice(int(os.environ.get('NICE', '10')))\nwhile True:\n  pass\n"


def start_load(count: int, command: str | None, nice: int) -> list[subprocess.Popen]:
  """``count`` busy processes: spinning Python, or ``command`` run again and again (nice'd)."""
  if command:
    loop = f"while true; do nice -n {nice} {command} >/dev/null 2>&1; done"
    cmd = ["bash", "-c", loop]
  else:
    cmd = [sys.executable, "-c", SPIN]
  env = dict(os.environ, NICE=str(nice))
  return [subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True) for _ in range(count)]


def stop_load(procs: list[subprocess.Popen]) -> None:
  for p in procs:
    os.killpg(p.pid, signal.SIGKILL)  # its own session: the loop and the command it runs
    p.wait()


def one_start(i: int, args: argparse.Namespace, logs: Path) -> dict:
  """Runs one two-process start; returns what happened (and keeps the output if it failed)."""
  workdir = Path(tempfile.mkdtemp(prefix=f"two_process_start_{i}."))
  env = {"JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}
  if args.cache == "per-run":
    env |= {
      "JAX_COMPILATION_CACHE_DIR": str(workdir / "cache"),
      "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    }
  elif args.cache == "shared":
    env |= {
      "JAX_COMPILATION_CACHE_DIR": str(logs / "shared_cache"),
      "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    }
  argv = ["-m", "experiments.digits", f"--workdir={workdir / 'run'}", *FLAGS]
  argv.append(f"--watchdog_seconds={args.watchdog_seconds}")
  began, load_average = time.monotonic(), os.getloadavg()[0]
  procs = launch.start_local_processes(argv, count=2, cwd=ROOT, env=env)
  outcome = "ok"
  try:
    outs = [p.communicate(timeout=args.timeout)[0] for p in procs]
  except KeyboardInterrupt:  # the loop is stopped: this start is not counted
    for p in procs:
      p.kill()
    shutil.rmtree(workdir, ignore_errors=True)
    raise
  except subprocess.TimeoutExpired:
    outcome = "timeout"
    for p in procs:
      if p.poll() is None:
        p.send_signal(signal.SIGUSR1)  # every thread's stack, printed by the process itself
    time.sleep(3)
    for p in procs:
      p.kill()
    outs = [p.communicate()[0] for p in procs]
  seconds = time.monotonic() - began
  codes = [p.returncode for p in procs]
  if outcome == "ok" and codes != [0, 0]:
    outcome = "stalled" if watchdog.EXIT_STALLED in codes else "failed"
  if outcome == "ok" and not (workdir / "run" / "summary.json").exists():
    outcome = "failed"
  if outcome != "ok":
    text = "".join(
      f"===== process {k} (exit {c})\n{o}\n" for k, (c, o) in enumerate(zip(codes, outs))
    )
    (logs / f"start_{i:03d}_{outcome}.txt").write_text(text)
  shutil.rmtree(workdir, ignore_errors=True)
  return {
    "run": i,
    "outcome": outcome,
    "seconds": round(seconds, 1),
    "codes": codes,
    "load_average": round(load_average, 1),
  }


def interrupt(signum, frame) -> None:
  raise KeyboardInterrupt


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--runs", type=int, default=50)
  parser.add_argument("--load", type=int, default=2, help="busy processes beside the starts")
  parser.add_argument("--load_command", default=None, help="shell command for the load (looped)")
  parser.add_argument("--nice", type=int, default=10, help="niceness of the load")
  parser.add_argument("--cache", choices=["per-run", "shared", "off"], default="per-run")
  parser.add_argument("--watchdog_seconds", type=float, default=120.0)
  parser.add_argument("--timeout", type=float, default=300.0, help="per start, seconds")
  parser.add_argument("--stop_on_failure", action="store_true")
  parser.add_argument("--logs", default=str(ROOT / "benchmarks/results/two_process_starts_logs"))
  parser.add_argument("--record", default=None, help="Markdown file to append the result row to")
  parser.add_argument("--note", default="", help="what this invocation tests (for the record)")
  args = parser.parse_args()
  logs = Path(args.logs)
  logs.mkdir(parents=True, exist_ok=True)
  load = start_load(args.load, args.load_command, args.nice)
  results, interrupted = [], False
  began = datetime.datetime.now(datetime.UTC)
  signal.signal(signal.SIGTERM, interrupt)  # stopped early: the starts done so far are recorded
  try:
    for i in range(args.runs):
      r = one_start(i, args, logs)
      results.append(r)
      print(json.dumps(r), flush=True)
      if r["outcome"] != "ok" and args.stop_on_failure:
        break
  except KeyboardInterrupt:
    interrupted = True
  finally:
    stop_load(load)
  if not results:
    return
  counts = {k: sum(r["outcome"] == k for r in results) for k in ("ok", "stalled", "timeout")}
  counts["failed"] = len(results) - sum(counts.values())
  streak = best = 0
  for r in results:
    streak = streak + 1 if r["outcome"] == "ok" else 0
    best = max(best, streak)
  times = [r["seconds"] for r in results]
  load_text = f"{args.load} x " + (f"`{args.load_command}`" if args.load_command else "spin")
  row = (
    f"| {began:%Y-%m-%d %H:%M} | {len(results)} | {load_text} (nice {args.nice}) | {args.cache} "
    f"| {counts['ok']} | {counts['stalled']} | {counts['timeout']} | {counts['failed']} | {best} "
    f"| {statistics.median(times):.0f} / {max(times):.0f} "
    f"| {statistics.median(r['load_average'] for r in results):.0f} "
    f"| {args.note}{' (stopped early)' if interrupted else ''} |"
  )
  print(row)
  print(f"host: {platform.node()}, {os.cpu_count()} cores, load average {os.getloadavg()}")
  if args.record:
    Path(args.record).open("a").write(row + "\n")


if __name__ == "__main__":
  main()
