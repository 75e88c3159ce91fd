"""Torture: `materialize` killed with SIGKILL at random moments, over and over, over full,
incremental and `--full-refresh` runs, the source changing between some of the kills; then one
clean run, with no manual step, must exit 0 and leave every app table equal to the source row
for row, every raw table holding each key once at the source's version, and no checkpoint ahead
of (or behind) the data.

The schedule comes from a seed, printed at the start (TORTURE_SEED=<seed> replays it; the kill
moments are wall-clock offsets, so a replay is close, not exact). TORTURE_KILLS sets how many kills
(default 20).
"""

from __future__ import annotations

import datetime as dt
import os
import random
import signal
import subprocess
import time

from runtime.local.seed import CASES, insert_rows, soft_delete, update_rows
from tests.failures.harness import materialize, spawn, wait_until
from tests.failures.test_crash_safety import (
    LATER,
    assert_app_in_step,
    assert_checkpoints_at_the_data,
    assert_raw_mirrors_source,
    seeded,  # noqa: F401 - fixture
    tail,
    wait_for_lock_release,
)
from tests.runtime.test_sync import CORE, live, source

#: Selections an incremental run picks from.
SUBSETS = ["calls", "users", "+speakers", "+transcripts", "calls,users", CORE]


class SourceChanges:
    """What later Fivetran syncs bring, drawn from the schedule's random generator."""

    def __init__(self, env, rng: random.Random) -> None:  # noqa: ANN001 - tests.conftest.Env
        self.env, self.rng, self.n = env, rng, 0

    def _at(self) -> dt.datetime:
        self.n += 1
        return LATER + dt.timedelta(seconds=self.n)

    def _plain_call(self) -> dict:
        rows = live(source(self.env, "call"))
        counts: dict[str, int] = {}
        for r in rows:
            counts[r["id"]] = counts.get(r["id"], 0) + 1
        return self.rng.choice(sorted((r for r in rows if counts[r["id"]] == 1), key=lambda r: (r["id"], r["workspace_id"])))

    def new_call(self) -> str:
        cid = f"94{self.n + 1:017d}"
        ws = self.rng.choice(CASES.workspace_ids)
        insert_rows(self.env.bq, self.env.gong("call"), [{"id": cid, "workspace_id": ws, "title": f"New {cid}"}],
                    synced_at=self._at())
        return f"new call {cid}"

    def rename_call(self) -> str:
        c = self._plain_call()
        update_rows(self.env.bq, self.env.gong("call"), {"id": c["id"], "workspace_id": c["workspace_id"]},
                    {"title": f"Renamed {self.n + 1}"}, self._at())
        return f"renamed call {c['id']}"

    def delete_call(self) -> str:
        c = self._plain_call()
        soft_delete(self.env.bq, self.env.gong("call"), {"id": c["id"], "workspace_id": c["workspace_id"]}, self._at())
        return f"soft-deleted call {c['id']}"

    def _speaker(self) -> dict:
        calls = {c["id"] for c in live(source(self.env, "call"))}
        return self.rng.choice(sorted((s for s in live(source(self.env, "call_speaker")) if s["call_id"] in calls),
                                      key=lambda s: (s["call_id"], s["id"])))

    def delete_speaker(self) -> str:
        s = self._speaker()
        soft_delete(self.env.bq, self.env.gong("call_speaker"), {"id": s["id"], "call_id": s["call_id"]}, self._at())
        return f"soft-deleted speaker {s['id']} of call {s['call_id']}"

    def talk_time(self) -> str:
        s = self._speaker()
        update_rows(self.env.bq, self.env.gong("call_speaker"), {"id": s["id"], "call_id": s["call_id"]},
                    {"talk_time": float(self.rng.randrange(1, 3000))}, self._at())
        return f"talk time of speaker {s['id']}"

    def rename_user(self) -> str:
        users = sorted((u for u in live(source(self.env, "users"))
                        if (u["email_address"] or "").endswith("@" + CASES.internal_domain)), key=lambda u: u["id"])
        u = self.rng.choice(users)
        update_rows(self.env.bq, self.env.gong("users"), {"id": u["id"]},
                    {"first_name": f"Renamed{self.n + 1}"}, self._at())
        return f"renamed user {u['id']}"

    def some(self) -> list[str]:
        kinds = [self.new_call, self.rename_call, self.delete_call, self.delete_speaker, self.talk_time, self.rename_user]
        return [self.rng.choice(kinds)() for _ in range(self.rng.randint(1, 3))]


def killed(process: subprocess.Popen) -> bool:
    """SIGKILL the run; False when it ended by itself in the instant before the signal (a run
    exits at once after its summary, so the race is real): the caller counts it as ended first."""
    process.send_signal(signal.SIGKILL)
    return process.wait(30) == -signal.SIGKILL


def test_torture_random_kills_then_one_clean_run_is_in_step(seeded, subprocess_env, tmp_path):  # noqa: F811
    env = seeded
    seed = int(os.environ.get("TORTURE_SEED") or random.SystemRandom().randrange(1 << 32))
    wanted = int(os.environ.get("TORTURE_KILLS") or 20)
    print(f"torture: seed {seed} (TORTURE_SEED={seed} replays the schedule)", flush=True)
    rng = random.Random(seed)
    changes = SourceChanges(env, rng)
    # At least a quarter of the kills of each kind, in a shuffled order; the first runs are first loads.
    kinds = ["full"] * (wanted // 4) + ["incremental"] * (wanted // 4) + ["full-refresh"] * (wanted // 4)
    kinds += rng.choices(["full", "incremental", "full-refresh"], k=wanted - len(kinds))
    rng.shuffle(kinds)
    journal: list[str] = []
    kills = attempts = 0
    started = time.monotonic()
    while kills < wanted:
        attempts += 1
        # Runs of one small asset often end before their kill: a no-change run is ~1 s of work.
        assert attempts <= wanted * 4, ("too many runs ended before they could be killed", seed, journal)
        kind = kinds[kills]
        args = {"full": ["--asset", CORE], "full-refresh": ["--asset", CORE, "--full-refresh"],
                "incremental": ["--asset", rng.choice(SUBSETS)]}[kind]
        log = tmp_path / f"run-{attempts:02d}.log"
        spawned = time.monotonic()
        process = spawn(*args, environ=subprocess_env, log_path=log)
        try:
            # The source changes while the run starts up (a Fivetran sync does not wait for us).
            if attempts > 1 and rng.random() < 0.5:
                journal.append(f"   source, while run {attempts:02d} starts: {'; '.join(changes.some())}")
            if rng.random() < 0.2:
                # Any moment at all: starting up, checking, taking the lock, or working.
                delay = max(0.0, rng.uniform(1.0, 8.0) - (time.monotonic() - spawned))
                moment = f"{time.monotonic() - spawned + delay:.2f}s after the start"
            else:
                wait_until(lambda: "asset.start" in tail(log, 10**7) or process.poll() is not None, 120,  # noqa: B023
                           "a run to start its first asset")
                delay = rng.uniform(0.0, 3.0)
                moment = f"{delay:.2f}s into the work"
            try:
                process.wait(delay)
            except subprocess.TimeoutExpired:
                pass
            if process.poll() is None and killed(process):
                kills += 1
                journal.append(f"{attempts:02d} {kind:<12} {' '.join(args[1:]):<40} killed {moment}")
            else:
                journal.append(f"{attempts:02d} {kind:<12} {' '.join(args[1:]):<40} ended first, exit {process.returncode}"
                               + ("" if process.returncode == 0 else f": {tail(log, 600)!r}"))
        finally:
            if process.poll() is None:
                killed(process)
        wait_for_lock_release(env)
    journal.append(f"   source, before the clean run: {'; '.join(changes.some())}")
    tortured = time.monotonic() - started
    print("\n".join(journal), flush=True)

    result = materialize("--asset", CORE, environ=subprocess_env)
    print(f"torture: {kills} kills in {tortured:.0f} s; the clean run exited {result.returncode}", flush=True)
    assert result.returncode == 0, (seed, result.stdout[-3000:] + result.stderr[-5000:])
    assert "status success" in result.stdout, (seed, result.stdout)
    assert_app_in_step(env)
    assert_raw_mirrors_source(env)
    assert_checkpoints_at_the_data(env, tmp_path / "new-machine")
    # Never stuck: a run the schedule did not manage to kill ended like any run does.
    assert not [line for line in journal if "ended first, exit" in line and "exit 0" not in line], (seed, journal)
