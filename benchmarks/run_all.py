"""Run every benchmark with its small defaults, one after another, each in its own
process; figures go to stdout and ``benchmarks/results/*.json``.

    python -m benchmarks                  # or: python -m benchmarks.run_all, make bench
    python -m benchmarks --only synthesis memory
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from benchmarks.common import ROOT

BENCHMARKS = ("synthesis", "ingest", "versioning", "metrics", "orchestration", "memory", "sampling", "scaleout")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the synthmed benchmarks (small defaults).")
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, default=list(BENCHMARKS))
    args = parser.parse_args(argv)
    env = {
        **os.environ,
        "NO_ALBUMENTATIONS_UPDATE": "1",
        "PYTHONPATH": str(ROOT),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",  # no telemetry writes racing the SQLite API
        "DO_NOT_TRACK": "1",
    }
    failed = []
    for name in args.only:
        print(f"\n===== bench_{name} =====", flush=True)
        start = time.perf_counter()
        code = subprocess.call([sys.executable, "-m", f"benchmarks.bench_{name}"], cwd=ROOT, env=env)
        print(f"===== bench_{name}: exit {code}, {time.perf_counter() - start:.0f} s =====", flush=True)
        if code:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
