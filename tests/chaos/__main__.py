"""python -m tests.chaos: one chaos run; prints the books, exit 1 if an invariant fails."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from engine.logs import configure_logging
from tests.chaos.config import ChaosConfig
from tests.chaos.harness import run_chaos
from tests.chaos.report import format_report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.chaos",
        description="Run a genserve server in this process under mixed load (images and text, Generate and GenerateStream, "
        "many clients) while injecting faults: stage kills, decode-loop and forward-pass failures, stalled batches, "
        "clients that disconnect, deadlines that expire while queued. Print the books; exit 1 if an invariant fails.",
    )
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load and fault injection")
    parser.add_argument("--seed", type=int, default=0, help="seeds the fault schedule and the clients' requests")
    parser.add_argument("--models-dir", default="models")
    parser.add_argument("--json", type=Path, default=None, help="also write the report here, as JSON")
    parser.add_argument("--log-level", default="critical", help="the server's log level (its injected failures log tracebacks)")
    args = parser.parse_args(argv)
    configure_logging("console", args.log_level)
    report = asyncio.run(run_chaos(ChaosConfig(duration_s=args.duration, seed=args.seed, models_dir=args.models_dir)))
    print(format_report(report))
    if args.json is not None:
        args.json.write_text(json.dumps(report.to_json(), indent=2) + "\n")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
