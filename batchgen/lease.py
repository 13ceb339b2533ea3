"""The output lease: one writer per output, taken with a conditional create and kept alive by a heartbeat.

Protocol (README, "One writer per output"): the lease is a sequence of objects `_batchgen/lease/<epoch>.json`,
epochs 1, 2, 3...; the highest epoch is the current lease. A run takes epoch N+1 with a conditional create
(S3 `If-None-Match: *`, a hard link locally) only when epoch N is released or its heartbeat is older than the
timeout, so of two runs racing for N+1 exactly one creates it and the other refuses. The holder rewrites its own
object with a fresh `heartbeat_at` from a daemon thread and marks it released when it ends. Writers fence
themselves: before a commit they check that epoch N+1 does not exist (`check_fence`)."""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass, replace

from batchgen.errors import BatchgenError, JobConfigError
from batchgen.storage import Storage

logger = logging.getLogger(__name__)

LEASE_PREFIX = "_batchgen/lease/"
_SUFFIX = ".json"


class LeaseHeld(JobConfigError):
    """Another run holds the output's lease and was seen recently. Exit code 2: nothing was started."""


class LeaseLost(BatchgenError):
    """A newer run took the output's lease over: this run must not commit anything more."""


@dataclass(frozen=True)
class Holder:
    """What one lease object records: which run holds (or held) the epoch, and when it was last seen."""

    epoch: int
    run_id: str
    host: str
    pid: int
    acquired_at: float
    heartbeat_at: float
    timeout_s: float
    released: bool = False

    def describe(self, now: float) -> str:
        return (f"run {self.run_id} (host {self.host}, pid {self.pid}, lease epoch {self.epoch}), last seen "
                f"{now - self.heartbeat_at:.1f} s ago")


def lease_key(epoch: int) -> str:
    return f"{LEASE_PREFIX}{epoch:010d}{_SUFFIX}"


def latest_epoch(storage: Storage) -> int:
    """The current lease's epoch; 0 for an output no run has leased."""
    epochs = [int(key[len(LEASE_PREFIX) : -len(_SUFFIX)]) for key in storage.list(LEASE_PREFIX)
              if key.endswith(_SUFFIX) and key[len(LEASE_PREFIX) : -len(_SUFFIX)].isdigit()]
    return max(epochs, default=0)


def read_holder(storage: Storage, epoch: int) -> Holder:
    key = lease_key(epoch)
    try:
        return Holder(**json.loads(storage.get(key)))
    except (ValueError, TypeError) as e:
        raise JobConfigError(f"lease object {storage.uri_for(key)!r} is not a batchgen lease: {e}") from None


def check_fence(storage: Storage, epoch: int) -> None:
    """Raise LeaseLost when a run has taken the lease over from `epoch` (one HEAD request)."""
    if storage.exists(lease_key(epoch + 1)):
        raise LeaseLost(f"the lease on {storage.uri} (epoch {epoch}) was taken over by a newer run "
                        f"({storage.uri_for(lease_key(epoch + 1))}); this run stops without committing more")


class OutputLease:
    """acquire() -> heartbeats on a daemon thread -> release(). Use as a context manager around a run."""

    def __init__(self, storage: Storage, run_id: str, timeout_s: float, clock=time.time):
        self.storage = storage
        self.run_id = run_id
        self.timeout_s = timeout_s
        self.clock = clock
        self.holder: Holder | None = None
        self.took_over: Holder | None = None  # the stale holder this run replaced, if any
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def epoch(self) -> int:
        assert self.holder is not None, "the lease is not held"
        return self.holder.epoch

    def acquire(self) -> None:
        """Take the next epoch, or raise LeaseHeld naming the live holder."""
        for _ in range(3):
            top = latest_epoch(self.storage)
            stale: Holder | None = None
            if top:
                current = read_holder(self.storage, top)
                now = self.clock()
                # Judged by the holder's own timeout: it heartbeats at a quarter of that, whatever ours is.
                if not current.released:
                    if now - current.heartbeat_at < current.timeout_s:
                        raise LeaseHeld(
                            f"output {self.storage.uri!r} is being written by {current.describe(now)}; wait for it "
                            f"to end, or, if it died, rerun once its heartbeat is its `output.lease_timeout_s` "
                            f"({current.timeout_s:g} s) old to take it over"
                        )
                    stale = current
            now = self.clock()
            mine = Holder(top + 1, self.run_id, socket.gethostname(), os.getpid(), now, now, self.timeout_s)
            self.storage.put_if_absent(lease_key(mine.epoch), _encode(mine), "application/json")
            # Who won is read back, not taken from the create's answer: a create retried after its first attempt
            # succeeded answers "exists", and a store that ignored If-None-Match shows its last writer here.
            if read_holder(self.storage, mine.epoch).run_id == self.run_id:
                self.holder = mine
                self.took_over = stale
                if stale is not None:
                    logger.warning("took over the lease on %s from %s (its heartbeat is older than %g s)",
                                   self.storage.uri, stale.describe(now), stale.timeout_s)
                logger.info("holding the lease on %s (epoch %d, run %s)", self.storage.uri, mine.epoch, self.run_id)
                return
            # Another run created that epoch first: look again; it is live, so the next pass refuses naming it.
        raise LeaseHeld(f"output {self.storage.uri!r}: other runs keep taking its lease; try again later")

    def start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, name="batchgen-lease", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        interval = max(0.05, self.timeout_s / 4)
        while not self._stop.wait(interval):
            try:
                check_fence(self.storage, self.epoch)
                self._write(replace(self.holder, heartbeat_at=self.clock()))
            except LeaseLost as e:
                logger.error("%s", e)
                return
            except BatchgenError as e:  # an unreachable store: keep trying; the store stage's fence decides
                logger.warning("lease heartbeat on %s failed: %s", self.storage.uri, e)

    def check(self) -> None:
        check_fence(self.storage, self.epoch)

    def release(self) -> None:
        """Stop the heartbeat and mark the epoch released (a later run takes the next epoch at once)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.holder is None:
            return
        try:
            self._write(replace(self.holder, heartbeat_at=self.clock(), released=True))
        except BatchgenError as e:
            logger.warning("could not release the lease on %s (it expires after %g s): %s",
                           self.storage.uri, self.timeout_s, e)

    def _write(self, holder: Holder) -> None:
        self.holder = holder
        self.storage.put(lease_key(holder.epoch), _encode(holder), "application/json")

    def __enter__(self) -> OutputLease:
        self.acquire()
        self.start_heartbeat()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _encode(holder: Holder) -> bytes:
    return json.dumps(asdict(holder), sort_keys=True).encode()

