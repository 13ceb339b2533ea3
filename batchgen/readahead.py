"""Bound how far the prompt reader runs ahead of the generators, in rows.

Ray Data's own backpressure budgets object-store bytes. Prompt rows are tiny next to images, so within that
budget the reader of a big table runs millions of rows ahead of a slow generator pool, and every queued
block costs bookkeeping in the driver's heap: the driver's memory grew with the input (bench/RESULTS.md, c).
This policy starts no new read task (nor re-blocking task) while the rows it has produced that no generator
task has been handed yet reach a cap sized in generator calls. A running task is not paused, so the queue can
exceed the cap by the rows of the read tasks in flight (`compute.read_tasks`, one Parquet row group each).

It plugs into Ray Data's backpressure-policy hook (`DataContext.set_config`), which lives under
`ray.data._internal`: if a Ray version lacks it, `install` logs a warning and the job runs unbounded, as
before, rather than failing.
"""

from __future__ import annotations

import logging
from typing import Any

try:
    from ray.data._internal.execution import backpressure_policy as _bp

    _Base = _bp.BackpressurePolicy
    _bp.ENABLED_BACKPRESSURE_POLICIES_CONFIG_KEY, _bp.ENABLED_BACKPRESSURE_POLICIES  # noqa: B018
except (ImportError, AttributeError):  # a Ray without the hook: install() says so and does nothing
    _bp = None
    _Base = object

logger = logging.getLogger(__name__)

CONFIG_KEY = "batchgen.read_ahead"
READER_OP = "read_prompt_rows"  # the name of the reader's map_batches function: Ray names the operator by it
GENERATOR_OP = "GeneratorActor"


def read_ahead_rows(rows_per_call: int, max_actors: int, calls_per_actor: int, rows_per_read: int) -> int:
    """The cap: `calls_per_actor` calls queued for every actor, and never less than one read batch plus one
    call (so the reader can always produce the rows of the next call)."""
    return max(rows_per_call * max_actors * calls_per_actor, rows_per_read + rows_per_call)


def install(context: Any, max_rows: int) -> bool:
    """Add the policy to this DataContext's backpressure policies; False when this Ray has no hook for it."""
    if _bp is None:
        logger.warning("this Ray has no backpressure-policy hook: the prompt reader's read-ahead is unbounded")
        return False
    policies = [p for p in context.get_config(_bp.ENABLED_BACKPRESSURE_POLICIES_CONFIG_KEY,
                                              _bp.ENABLED_BACKPRESSURE_POLICIES) if p is not ReadAheadCap]
    context.set_config(_bp.ENABLED_BACKPRESSURE_POLICIES_CONFIG_KEY, [*policies, ReadAheadCap])
    context.set_config(CONFIG_KEY, int(max_rows))
    return True


class ReadAheadCap(_Base):  # type: ignore[misc, valid-type]
    """Backpressures the reader (and the re-blocking after it) while the rows it produced that no generator task
    has been handed yet reach the cap."""

    def __init__(self, data_context, topology, resource_manager):
        super().__init__(data_context, topology, resource_manager)
        self._max_rows = data_context.get_config(CONFIG_KEY, None)
        reader = generator = None
        for op in topology:
            if READER_OP in op.name:
                reader = op
            elif GENERATOR_OP in op.name:
                generator = op
        self._generator = generator
        # The reader and every operator between it and the generators (the re-blocking to call size): each
        # is held back while the rows it has produced that no generator has taken yet reach the cap.
        self._gated: list = []
        op = generator
        while op is not None and op is not reader and len(op.input_dependencies) == 1:
            op = op.input_dependencies[0]
            self._gated.append(op)
        if self._max_rows is not None and (reader is None or generator is None or op is not reader):
            logger.warning("read-ahead cap not applied: operators %s / %s not found in %s", READER_OP,
                           GENERATOR_OP, [op.name for op in topology])
            self._max_rows = None

    @property
    def name(self) -> str:
        return "ReadAheadCap"

    def queued_rows(self, op) -> int:
        """Rows `op` has produced that no generator task has been handed yet."""
        produced = op.metrics.rows_task_outputs_generated or 0
        return produced - (self._generator.metrics.rows_inputs_of_submitted_tasks or 0)

    def _full(self, op) -> bool:
        return self._max_rows is not None and op in self._gated and self.queued_rows(op) >= self._max_rows

    def can_add_input(self, op) -> bool:
        return not self._full(op)
