"""The job's output in one object, with a Ray Datasink's lifecycle: start (under the output's lease), the store
stage, commit."""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

from batchgen.errors import JobConfigError
from batchgen.lease import OutputLease
from batchgen.manifest import SUCCESS_KEY, Committed, read_committed, write_success
from batchgen.models.source import ModelFacts
from batchgen.prompts import DoneKeys
from batchgen.resume import FINGERPRINT_KEY, check_fingerprint
from batchgen.spec import JobSpec, dump_spec
from batchgen.stages import StoreStage
from batchgen.storage import open_storage
from batchgen.writers import layout_for

logger = logging.getLogger(__name__)

STATE_PREFIX = "_batchgen/"


@dataclass
class RunTally:
    """What this run's store calls reported (one summary row each), summed on the driver."""

    ok: int = 0
    errors: int = 0
    skipped: int = 0
    retried_errors: int = 0
    first_stored_at: float | None = None

    def add(self, summary: dict[str, Any]) -> None:
        self.ok += summary["ok"]
        self.errors += summary["errors"]
        self.skipped += summary["skipped"]
        self.retried_errors += summary["retried_errors"]
        if summary["first_stored_at"] and self.first_stored_at is None:
            self.first_stored_at = summary["first_stored_at"]


class JobOutput:
    """One job's output, its storage opened once; a context manager that holds the output's lease from `start`
    to its exit. `start` takes the lease and reads what is committed; `begin` (once the cluster is known)
    checks the resolved fingerprint and marks the output incomplete; `store_stage` is what the pipeline's store
    tasks run (the layout's writers, fenced by the lease); `commit` writes _SUCCESS with the totals, last."""

    def __init__(self, spec: JobSpec):
        out = spec.output
        self.spec = spec
        self.storage = open_storage(out.uri, retry_deadline_s=out.retry_deadline_s, max_workers=out.upload_workers)
        self.layout = layout_for(out.layout, out.shard_samples, out.shard_bytes)
        self.committed = Committed(DoneKeys(), DoneKeys())
        self.lease: OutputLease | None = None

    @property
    def uri(self) -> str:
        return self.storage.uri

    @property
    def run_id(self) -> str:
        assert self.lease is not None, "start() first"
        return self.lease.run_id

    def __enter__(self) -> JobOutput:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.lease is not None:
            self.lease.release()

    def start(self, fingerprint: dict[str, Any]) -> DoneKeys:
        """Take the lease, refuse a foreign _SUCCESS or a changed fingerprint, read what is committed; returns
        the (id, sample) keys this run skips."""
        if self.storage.exists(SUCCESS_KEY) and not self.storage.exists(FINGERPRINT_KEY):
            raise JobConfigError(f"`output.uri` {self.storage.uri!r} holds a _SUCCESS that batchgen did not write "
                                 f"(no {FINGERPRINT_KEY}): batchgen replaces only its own; choose another output")
        self.lease = OutputLease(self.storage, uuid.uuid4().hex[:12], self.spec.output.lease_timeout_s)
        self.lease.__enter__()
        check_fingerprint(self.storage, fingerprint, override=self.spec.output.override_fingerprint, record=False)
        self.committed = read_committed(self.storage)
        return self.committed.skip(self.spec.output.retry_errors)

    def begin(self, resolved_fingerprint: dict[str, Any]) -> None:
        """Before the first write: mark the output incomplete, record the spec, check (and on first use record)
        the fingerprint with the actors' device class and dtype resolved."""
        assert self.lease is not None, "start() first"
        self.storage.delete(SUCCESS_KEY)
        self.storage.put(STATE_PREFIX + "job.yaml", dump_spec(self.spec).encode(), "application/yaml")
        check_fingerprint(self.storage, resolved_fingerprint, override=self.spec.output.override_fingerprint,
                          epoch=self.lease.epoch, run_id=self.lease.run_id)

    def store_stage(self, model: ModelFacts) -> StoreStage:
        assert self.lease is not None, "start() first"
        out = self.spec.output
        return StoreStage(self.storage, out.format, out.quality, model, self.lease.run_id, self.lease.epoch,
                          self.layout, self.committed.failed if out.retry_errors else None)

    def commit(self, rows: int, run: RunTally, started: float) -> dict[str, Any]:
        """_SUCCESS, the run's last write, while still holding the lease. Totals are what was committed at start
        plus what this run stored: no manifest is re-read."""
        assert self.lease is not None, "start() first"
        wall = time.time() - started
        summary = {
            "run_id": self.lease.run_id,
            "lease_epoch": self.lease.epoch,
            "rows": rows,
            "images_ok": run.ok,
            "errors": run.errors,
            "generated": run.ok + run.errors,
            "skipped_done": run.skipped,
            "images_ok_total": len(self.committed.ok) + run.ok,
            "errors_total": len(self.committed.failed) - run.retried_errors + run.errors,
            "wall_s": round(wall, 3),
            "images_per_s": round(run.ok / wall, 4) if wall > 0 else 0.0,
            "first_image_s": round(run.first_stored_at - started, 3) if run.first_stored_at else None,
            "output": self.storage.uri,
        }
        self.lease.check()
        write_success(self.storage, summary)
        return summary
