"""Where the test suite's CPU time goes: runs the README's test command with every Python process it starts logging
its own CPU time at exit (docs/benchmarks.md §6).

    python benchmarks/suite_cpu.py [pytest args ...]     # default: -q -p no:cacheprovider

Prints the suite's wall time, the CPU seconds of all logged processes, the split by kind (the pytest-xdist workers,
which run the in-process tests; `main.py train` / `predict` / ... subprocesses; other Python subprocesses) and the
costliest processes. A process killed with SIGKILL (the tests' kill -9 runs) logs nothing, so the total is a floor.
"""

from __future__ import annotations

import collections
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Loaded by every Python process of the run through PYTHONPATH (`site` imports `sitecustomize`).
SITECUSTOMIZE = '''
import atexit, os, sys, time
_t0 = time.time()
def _log():
    t = os.times()
    with open(os.environ["SUITE_CPU_LOG"], "a") as f:
        f.write(f"{t.user + t.system:.2f}\\t{time.time() - _t0:.2f}\\t{' '.join(sys.argv)}\\n")
atexit.register(_log)
'''


def kind(argv: str) -> str:
    words = argv.split()
    if not words or words[0] == "-c":
        return "pytest-xdist workers and `python -c` subprocesses"
    if "pytest" in words[0]:
        return "pytest's own process (the tests themselves with -n 0)"
    if words[0].endswith("main.py") and len(words) > 1:
        return f"main.py {words[1]}"
    return "other"


def main(argv: list[str]) -> int:
    args = argv or ["-q", "-p", "no:cacheprovider"]
    with tempfile.TemporaryDirectory(prefix="suite-cpu-") as tmp:
        (Path(tmp) / "sitecustomize.py").write_text(SITECUSTOMIZE)
        log = Path(tmp) / "procs.tsv"
        env = dict(os.environ, SUITE_CPU_LOG=str(log),
                   PYTHONPATH=os.pathsep.join(filter(None, [tmp, os.environ.get("PYTHONPATH", "")])))
        start = time.time()
        rc = subprocess.call([sys.executable, "-m", "pytest", *args], cwd=ROOT, env=env)
        wall = time.time() - start
        rows = [line.split("\t", 2) for line in log.read_text().splitlines()] if log.exists() else []
    rows = [(float(cpu), float(w), a) for cpu, w, a in rows]
    by_kind: dict[str, list[float]] = collections.defaultdict(list)
    for cpu, _, a in rows:
        by_kind[kind(a)].append(cpu)
    print(f"\nsuite: exit {rc}, {wall:.0f} s wall; {len(rows)} Python processes logged, "
          f"{sum(r[0] for r in rows):.0f} CPU s in all")
    for k, v in sorted(by_kind.items(), key=lambda kv: -sum(kv[1])):
        print(f"  {sum(v):7.1f} CPU s  {len(v):3d} processes  {k}")
    print("costliest processes (CPU s, wall s, command):")
    for cpu, w, a in sorted(rows, key=lambda r: -r[0])[:15]:
        print(f"  {cpu:7.1f} {w:7.1f}  {a[:160]}")
    return rc


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
