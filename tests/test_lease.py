"""The output lease on a local directory and on S3 (moto): one holder, refusals that name it, heartbeats, and a
race-free takeover of a stale lease."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import pytest

from batchgen.lease import LeaseHeld, LeaseLost, OutputLease, check_fence, latest_epoch, read_holder
from batchgen.storage import Storage, open_storage

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(params=["local", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "local":
        return open_storage(str(tmp_path / "out"))
    return open_storage(f"s3://{request.getfixturevalue('s3_bucket')}/out", retry_deadline_s=10)


class Clock:
    def __init__(self, now: float = 1_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_a_second_run_is_refused_naming_the_holder_until_the_first_releases(storage: Storage) -> None:
    clock = Clock()
    first = OutputLease(storage, "run-a", timeout_s=60, clock=clock)
    first.acquire()
    assert first.epoch == 1 and latest_epoch(storage) == 1
    clock.now += 59
    with pytest.raises(LeaseHeld) as refused:
        OutputLease(storage, "run-b", timeout_s=60, clock=clock).acquire()
    holder = read_holder(storage, 1)
    assert refused.value.exit_code == 2
    assert (f"run run-a (host {holder.host}, pid {holder.pid}, lease epoch 1), last seen 59.0 s ago"
            in str(refused.value)), refused.value
    first.release()
    assert read_holder(storage, 1).released
    second = OutputLease(storage, "run-b", timeout_s=60, clock=clock)
    second.acquire()
    assert (second.epoch, second.took_over) == (2, None)
    check_fence(storage, 2)
    with pytest.raises(LeaseLost):
        check_fence(storage, 1)


def test_a_stale_lease_is_taken_over_with_a_warning_and_the_old_holder_is_fenced(
    storage: Storage, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    dead = OutputLease(storage, "dead", timeout_s=30, clock=clock)
    dead.acquire()  # never releases: a killed driver
    clock.now += 31
    with caplog.at_level(logging.WARNING, "batchgen.lease"):
        taker = OutputLease(storage, "taker", timeout_s=30, clock=clock)
        taker.acquire()
    assert taker.epoch == 2 and taker.took_over is not None and taker.took_over.run_id == "dead"
    assert any("took over the lease" in r.message and "run dead" in r.message for r in caplog.records)
    with pytest.raises(LeaseLost, match="taken over"):
        dead.check()
    taker.check()


def test_of_many_runs_taking_over_one_stale_lease_exactly_one_wins(storage: Storage) -> None:
    clock = Clock()
    OutputLease(storage, "dead", timeout_s=30, clock=clock).acquire()
    clock.now += 100
    start = threading.Barrier(6)
    outcomes: dict[str, object] = {}

    def take(name: str) -> None:
        lease = OutputLease(storage, name, timeout_s=30, clock=clock)
        start.wait()
        try:
            lease.acquire()
            outcomes[name] = lease.epoch
        except LeaseHeld as e:
            outcomes[name] = e

    threads = [threading.Thread(target=take, args=(f"taker-{n}",)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [name for name, outcome in outcomes.items() if outcome == 2]
    assert len(winners) == 1, outcomes
    assert latest_epoch(storage) == 2 and read_holder(storage, 2).run_id == winners[0]
    assert all(isinstance(o, LeaseHeld) and winners[0] in str(o) for n, o in outcomes.items() if n != winners[0])


def test_the_heartbeat_keeps_a_long_run_live_and_release_marks_it_released(storage: Storage) -> None:
    with OutputLease(storage, "long", timeout_s=0.8) as lease:
        acquired = read_holder(storage, 1).heartbeat_at
        time.sleep(1.5)  # longer than the timeout: only heartbeats keep it live
        assert read_holder(storage, 1).heartbeat_at > acquired
        with pytest.raises(LeaseHeld, match="run long"):
            OutputLease(storage, "other", timeout_s=0.8).acquire()
        assert lease.epoch == 1
    assert read_holder(storage, 1).released

