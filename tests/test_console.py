"""The console: benign library warnings are kept for -v; the progress bar draws progress records."""

from __future__ import annotations

import io
import logging

from batchgen.console import VERBOSE_ENV, ProgressBar, quiet_benign_warnings


def emitted(name: str, message: str) -> list[str]:
    seen: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    target = logging.getLogger(name)
    handler = Collect()
    target.addHandler(handler)
    try:
        target.warning(message)
    finally:
        target.removeHandler(handler)
    return seen


def test_benign_library_warnings_only_with_verbose(monkeypatch):
    import batchgen  # noqa: F401 - importing batchgen installs the filters, in Ray workers too

    quiet_benign_warnings()  # idempotent
    torchvision = ("`CLIPImageProcessor` requires torchvision (not installed); falling back to "
                   "`CLIPImageProcessorPil` for backward compatibility.")
    monkeypatch.delenv(VERBOSE_ENV, raising=False)
    assert emitted("transformers.utils.import_utils", torchvision) == []
    assert emitted("ray._private.authentication.authentication_token_setup",
                   "Token authentication is enabled for this Ray cluster.") == []
    # Anything else from the same loggers still shows, and -v shows everything.
    assert emitted("transformers.utils.import_utils", "something else") == ["something else"]
    monkeypatch.setenv(VERBOSE_ENV, "1")
    assert emitted("transformers.utils.import_utils", torchvision) == [torchvision]


def test_progress_bar_rewrites_one_line():
    stream = io.StringIO()
    bar = ProgressBar(stream, width=10)
    logger = logging.getLogger("batchgen.progress.test")
    logger.propagate = False
    logger.addHandler(bar)
    logger.setLevel(logging.INFO)
    logger.info("x", extra={"progress": (5, 20, 2.5)})
    logger.info("x", extra={"progress": (20, 20, 4.0)})
    bar.finish()
    assert stream.getvalue() == ("\r[##........] 5/20 images, 2.50/s, ETA 6s  "
                                 "\r[##########] 20/20 images, 4.00/s, ETA 0s  \n")
