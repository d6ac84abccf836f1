"""Issue 13's proof: a fleet of real `huahua` processes on real Redis, PostgreSQL and S3 loses workers and
Redis while it draws 200 jobs, and every accepted job ends done once, every Telegram picture is posted once,
and the daily quota holds exactly. The scenario lives in tests/chaos_scenario.py (bench/chaos.py runs it at
1,000 jobs)."""

from __future__ import annotations

import pytest

from tests.chaos_scenario import ChaosConfig, missing_parts, run_chaos

pytestmark = pytest.mark.slow


async def test_nothing_is_lost_or_posted_twice_while_processes_and_redis_fail() -> None:
    missing = missing_parts()
    if missing:
        pytest.skip(missing)
    config = ChaosConfig(
        jobs=200, users=20, telegram_users=4, telegram_jobs=20, kill_every_s=6.0, deadline_s=480.0
    )
    report = await run_chaos(config)
    print("\n" + "\n".join(report.lines()))
    assert not report.problems, "\n".join(report.problems)
    sigkills = [kill for kill in report.kills if kill.signal == "SIGKILL"]
    assert len(sigkills) >= 3 and report.redis_restarts == 1
    assert report.done == report.web_accepted + report.telegram_jobs
    assert report.web_quota_refused > 0  # some users asked for more than the quota, and were refused
