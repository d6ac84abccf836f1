# ruff: noqa: E402  (sys.path is fixed before the project imports, see below)
"""Chaos benchmark: issue 13's chaos scenario at 1,000 jobs, printing throughput and reclaim latency.

Run by hand (not in CI): `python bench/chaos.py [--jobs 1000] [--users 100] [--kill-every 5]`. It starts
redis-server, a throwaway PostgreSQL cluster, moto's S3 server and the fake Telegram Bot API, then the
fleet (`huahua web`, `huahua serve` with Telegram, two `huahua jobs` with the tiny engine), sends the
requests, SIGKILLs a `huahua jobs` process every --kill-every seconds (one SIGTERM), restarts Redis once,
and checks every promise the CI test checks (tests/chaos_scenario.py). Needs the dev extra, redis-server
and PostgreSQL's server binaries. Exits 1 when a promise was broken.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import sys
from pathlib import Path

# Run as `python bench/chaos.py`, this file's folder comes first on sys.path, where bench/core.py would
# hide the `core` package: look for packages (core, tests) from the repository root instead.
_HERE = str(Path(__file__).resolve().parent)
while _HERE in sys.path:
    sys.path.remove(_HERE)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.chaos_scenario import ChaosConfig, ChaosReport, missing_parts, run_chaos


def summary(report: ChaosReport) -> list[str]:
    """The benchmark's own numbers after the scenario's report lines."""
    reclaims = sorted(report.reclaims)
    lines = [
        f"throughput: {report.throughput:.2f} jobs/s ({report.done} jobs in {report.end_to_end_s:.1f} s, "
        f"{report.config.workers} worker(s) in each of 2 `huahua jobs` processes)",
    ]
    if reclaims:
        lines.append(
            f"reclaim latency (SIGKILL -> next attempt started, {len(reclaims)} jobs): "
            f"median {statistics.median(reclaims):.2f} s, max {reclaims[-1]:.2f} s"
        )
    else:
        lines.append("reclaim latency: no SIGKILL hit a running job")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1000, help="web /imagine requests in all")
    parser.add_argument("--users", type=int, default=100, help="web users (the quota is jobs / users)")
    parser.add_argument("--telegram-jobs", type=int, default=50, help="Telegram /imagine requests")
    parser.add_argument("--telegram-users", type=int, default=10)
    parser.add_argument("--kill-every", type=float, default=5.0, help="seconds between SIGKILLs")
    parser.add_argument("--workers", type=int, default=1, help="workers in each `huahua jobs` process")
    parser.add_argument("--lease", type=float, default=3.0, help="HUAHUA_JOB_LEASE_S")
    parser.add_argument("--steps", type=int, default=2, help="sampling steps per picture")
    parser.add_argument("--deadline", type=float, default=1800.0, help="seconds for every job to end")
    parser.add_argument("--seed", type=int, help="seed of the chaos (which process, when)")
    parser.add_argument("--logs", type=Path, help="keep the processes' logs in this folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    missing = missing_parts()
    if missing:
        print(missing, file=sys.stderr)
        return 2
    config = ChaosConfig(
        jobs=args.jobs,
        users=args.users,
        telegram_users=args.telegram_users,
        telegram_jobs=args.telegram_jobs,
        kill_every_s=args.kill_every,
        lease_s=args.lease,
        steps=args.steps,
        workers=args.workers,
        redis_restart_after_s=max(10.0, args.jobs / 40),
        deadline_s=args.deadline,
        seed=args.seed,
    )
    report = asyncio.run(run_chaos(config, keep_logs=args.logs))
    print("\n".join(report.lines() + summary(report)))
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
