"""The batched classifier-free-guidance denoiser: rows in, images and per-row facts out. No Ray here."""

from __future__ import annotations

import logging
import time
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from batchgen.errors import RowError
from batchgen.models.adapter import Conditioning, FamilyAdapter, stack
from batchgen.models.loading import LoadedModel
from batchgen.rows import MAX_SEED, MAX_SIDE, MAX_STEPS, GenerationRequest, validate_request

# The row-level names live in the torch-free batchgen.rows; they stay importable from here.
__all__ = ["MAX_SEED", "MAX_SIDE", "MAX_STEPS", "Engine", "GenerationRequest", "GenerationResult", "validate_request"]

logger = logging.getLogger(__name__)

@dataclass
class GenerationResult:
    """One row's outcome: an image (HWC uint8, or float32 in [0, 1]) or an error naming the field."""

    image: np.ndarray | None
    seed: int
    truncated: bool = False
    error: str | None = None
    generate_ms: float = 0.0
    batch_size: int = 0

    @property
    def ok(self) -> bool:
        return self.error is None


# After this many chunks without running out of memory, a lowered batch limit doubles (up to the maximum).
GROW_AFTER = 16


@dataclass
class _LaunchedChunk:
    """A chunk whose compute is queued and whose images are on their way to host memory.

    On CUDA the copy into pinned memory is non-blocking and `ready` marks its end, so the next chunk's
    kernels are queued before anyone waits for this one; on CPU everything is already done."""

    indices: list[int]
    rows: list[GenerationRequest]
    images: torch.Tensor  # (B, H, W, C) on the host
    finite: torch.Tensor  # (B,) bool on the host
    elapsed_ms: float | None = None  # known at launch on CPU; from the events on CUDA
    start_event: Any = None
    ready: Any = None

    def collect(self, results: list[GenerationResult | None]) -> None:
        if self.ready is not None:
            self.ready.synchronize()
            self.elapsed_ms = self.start_event.elapsed_time(self.ready)
        per_row_ms = (self.elapsed_ms or 0.0) / len(self.rows)
        array = self.images.numpy()
        for n, (i, req, finite) in enumerate(zip(self.indices, self.rows, self.finite.tolist(), strict=True)):
            if finite:
                results[i] = GenerationResult(array[n], req.seed, generate_ms=per_row_ms, batch_size=len(self.rows))
            else:
                error = "generation produced non-finite values (NaN/inf latents); row not stored"
                results[i] = GenerationResult(None, req.seed, error=error, generate_ms=per_row_ms,
                                              batch_size=len(self.rows))


class Engine:
    """Runs batches of GenerationRequests on one loaded model; the model's family adapter samples.

    The same row gives the same image whatever the batch size and whatever rows share its batch:
    initial and per-step noise come from a CPU generator per row seeded with the row's seed, and all
    other per-row quantities (guidance, conditioning) are indexed, never shared. That is also what makes
    the out-of-memory fallback safe: a chunk that runs out of accelerator memory is retried in halves,
    and the batch limit grows back after `grow_after` chunks that fit.
    """

    def __init__(self, model: LoadedModel, max_batch_size: int | None = None, grow_after: int = GROW_AFTER):
        self.model = model
        self.adapter: FamilyAdapter = model.adapter
        self.device = model.device
        self.max_batch_size = max_batch_size
        self.batch_limit = max_batch_size  # lowered on out-of-memory, raised back after grow_after good chunks
        self.grow_after = grow_after
        self._fitted = 0
        self._ran_out_at = 0
        self._empty: Conditioning | None = None

    def empty_conditioning(self) -> Conditioning:
        """The empty-prompt conditioning (the default negative), computed once per model."""
        if self._empty is None:
            self._empty = self.adapter.empty_conditioning()
        return self._empty

    def generate(
        self, requests: list[GenerationRequest], output: Literal["uint8", "float"] = "uint8"
    ) -> list[GenerationResult]:
        """One result per request, in order. Bad rows become error results; the others still run."""
        results: list[GenerationResult | None] = [None] * len(requests)
        valid: list[int] = []
        for i, req in enumerate(requests):
            try:
                validate_request(req, self.adapter.rules)
                valid.append(i)
            except RowError as e:
                results[i] = GenerationResult(None, req.seed, error=str(e))
        if not valid:
            return results  # type: ignore[return-value]

        # 1. Encode each distinct text once for the whole call (sweeps repeat prompts), in one batch per shape
        # of encoding (the family says which texts share one). The empty negative's encoding is kept for the
        # model's lifetime; it is used where a row's key is the family's empty key.
        keys = {i: self.adapter.text_keys(requests[i]) for i in valid}
        empty = self.adapter.empty_key
        used = {key for pair in keys.values() for key in pair}
        batches: dict[Hashable, list[Hashable]] = {}
        for text in sorted(used - {empty}):
            batches.setdefault(self.adapter.encoding_batch(text), []).append(text)
        table: dict[Hashable, Conditioning] = {}
        truncated: dict[Hashable, bool] = {}
        for texts in batches.values():
            encoded = self.adapter.encode_text(texts)
            for n, text in enumerate(texts):
                table[text] = {name: tensor[n : n + 1] for name, tensor in encoded.conditioning.items()}
            truncated.update(zip(texts, encoded.truncated, strict=True))
        if empty in used:
            table[empty] = self.empty_conditioning()

        # 2. Group rows that can share a loop; run each group in chunks of at most the batch limit.
        # A chunk's images are collected only once the next chunk is queued (overlaps the copy on CUDA).
        groups: dict[tuple, list[int]] = {}
        for i in valid:
            groups.setdefault(requests[i].group_key(), []).append(i)
        pending: _LaunchedChunk | None = None
        for members in groups.values():
            start = 0
            while start < len(members):
                chunk = members[start : start + (self.batch_limit or len(members))]
                launched = self._launch_or_shrink(requests, chunk, table, keys, output, results)
                if launched is None and len(chunk) > 1:
                    continue  # retry the same rows at the lowered limit
                start += len(chunk)
                if launched is not None:
                    if pending is not None:
                        pending.collect(results)
                    pending = launched
        if pending is not None:
            pending.collect(results)
        for i in valid:
            results[i].truncated = truncated.get(keys[i][0], False)  # type: ignore[union-attr]
        return results  # type: ignore[return-value]

    def _launch_or_shrink(self, requests, chunk, table, keys, output, results) -> _LaunchedChunk | None:
        """Launch a chunk; on out-of-memory lower the batch limit and return None (a lone row becomes an error)."""
        try:
            launched = self._launch(requests, chunk, table, keys, output)
        except torch.OutOfMemoryError as e:
            message = str(e).splitlines()[0] if str(e) else "out of memory"
        else:
            self._fitted += 1
            if self.batch_limit != self.max_batch_size and self._fitted >= self.grow_after:
                self._grow()
            return launched
        # Outside the except block, so the failed attempt's tensors are freed before the cache is emptied.
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self._fitted = 0
        if len(chunk) == 1:
            req = requests[chunk[0]]
            results[chunk[0]] = GenerationResult(
                None, req.seed, error=f"out of accelerator memory at batch size 1 ({req.width}x{req.height}, "
                f"{req.steps} steps): {message}")
            return None
        if self.batch_limit == self.max_batch_size:
            self._ran_out_at = len(chunk)
        self.batch_limit = len(chunk) // 2
        logger.warning("out of memory at batch size %d; retrying at %d (%s)", len(chunk), self.batch_limit, message)
        return None

    def _grow(self) -> None:
        """Double the lowered limit; back to the configured maximum once it reaches it (or the size that ran out)."""
        doubled = 2 * self.batch_limit
        ceiling = self.max_batch_size or self._ran_out_at
        self.batch_limit = doubled if doubled < ceiling else self.max_batch_size
        self._fitted = 0
        logger.info("batch limit back up to %s after %d chunks that fit", self.batch_limit, self.grow_after)

    def _launch(self, requests, chunk, table, keys, output) -> _LaunchedChunk:
        rows = [requests[i] for i in chunk]
        on_cuda = self.device.type == "cuda"
        started = time.perf_counter()
        start_event = torch.cuda.Event(enable_timing=True) if on_cuda else None
        if start_event is not None:
            start_event.record()
        cond = stack([table[keys[i][0]] for i in chunk])
        uncond = stack([table[keys[i][1]] for i in chunk])
        images = self.denoise(rows, cond, uncond)
        with torch.inference_mode():
            finite = torch.isfinite(images).flatten(1).all(dim=1)
            if output == "uint8":
                images = (images * 255).round().to(torch.uint8)
            images = images.permute(0, 2, 3, 1)
            if not on_cuda:
                elapsed_ms = (time.perf_counter() - started) * 1000
                return _LaunchedChunk(chunk, rows, images.cpu(), finite.cpu(), elapsed_ms)
            # Queue the copies behind the compute; the next chunk is queued before anyone waits on `ready`.
            host = torch.empty(images.shape, dtype=images.dtype, pin_memory=True)
            host.copy_(images, non_blocking=True)
            finite_host = torch.empty(finite.shape, dtype=finite.dtype, pin_memory=True)
            finite_host.copy_(finite, non_blocking=True)
            ready = torch.cuda.Event(enable_timing=True)
            ready.record()
        return _LaunchedChunk(chunk, rows, host, finite_host, None, start_event, ready)

    def denoise(self, rows: list[GenerationRequest], cond: Conditioning, uncond: Conditioning) -> torch.Tensor:
        """Rows sharing steps, size, scheduler and eta -> float images in [0, 1], sampled by the family."""
        return self.adapter.sample(rows, cond, uncond)
