"""What a person sees on the console: batchgen's own progress and summary. Library messages they cannot act on are
kept for `-v` and log files: known-benign warnings are filtered in every batchgen process (driver and Ray workers),
and the native (C++) lines Ray writes straight to file descriptor 2 go to a log file. A live progress bar is drawn
when stdout is a terminal."""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
from pathlib import Path

VERBOSE_ENV = "BATCHGEN_VERBOSE"  # set by `-v`; Ray workers started by this process inherit it
PROGRESS_LOGGER = "batchgen.progress"

# (logger, message fragment): warnings about the environment that change nothing for the user's job.
BENIGN = (
    # transformers 5 without torchvision: its image processors fall back to their PIL versions (same results).
    ("transformers.utils.import_utils", "requires torchvision (not installed)"),
    # A local Ray enables token auth by default and says so on every start.
    ("ray._private.authentication.authentication_token_setup", "Token authentication is enabled"),
    # Ray Data says it disabled its progress bars, which batchgen does on purpose.
    ("ray.data._internal.progress", "Progress bars disabled"),
)


class BenignFilter(logging.Filter):
    def __init__(self, fragment: str):
        super().__init__()
        self.fragment = fragment

    def filter(self, record: logging.LogRecord) -> bool:
        return bool(os.environ.get(VERBOSE_ENV)) or self.fragment not in record.getMessage()


def quiet_benign_warnings() -> None:
    """Attach the filters to the loggers that emit them (logger filters run before any handler, including the
    libraries' own). Idempotent."""
    for name, fragment in BENIGN:
        target = logging.getLogger(name)
        if not any(isinstance(f, BenignFilter) and f.fragment == fragment for f in target.filters):
            target.addFilter(BenignFilter(fragment))


def stderr_is_terminal() -> bool:
    """Whether sys.stderr is this process's fd 2 on a terminal (not a pipe, a file or a test's capture)."""
    try:
        return sys.stderr.fileno() == 2 and os.isatty(2)
    except (AttributeError, OSError, ValueError):
        return False


def native_stderr_to_file() -> Path | None:
    """On a terminal, point file descriptor 2 at a log file and keep Python's sys.stderr on the terminal: Python
    logging, Click and Ray's forwarded worker output still reach the console; what native code writes to fd 2
    (Ray's core worker notes, such as its actor-restart remark) goes to the file. Where stderr is already a pipe
    or a file (CI, a log), nothing changes: that is the log file."""
    if not stderr_is_terminal():
        return None
    directory = Path(tempfile.gettempdir()) / "batchgen-logs"
    directory.mkdir(exist_ok=True)
    path = directory / f"native-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    sys.stderr.flush()
    terminal = os.dup(2)
    with open(path, "ab") as log:
        os.dup2(log.fileno(), 2)
    sys.stderr = os.fdopen(terminal, "w", buffering=1, encoding=sys.stderr.encoding, errors="backslashreplace")
    return path


class ProgressBar(logging.Handler):
    """Draws `batchgen.progress` records (extra `progress=(done, expected, rate)`) as one rewritten line."""

    def __init__(self, stream=None, width: int = 30):
        super().__init__()
        self.stream = stream or sys.stdout
        self.width = width
        self.drawn = False

    def emit(self, record: logging.LogRecord) -> None:
        done, expected, rate = getattr(record, "progress", (0, 0, 0.0))
        fraction = min(1.0, done / expected) if expected else 1.0
        filled = int(fraction * self.width)
        eta = f"{max(0, expected - done) / rate:.0f}s" if rate > 0 else "?"
        self.stream.write(f"\r[{'#' * filled}{'.' * (self.width - filled)}] {done}/{expected} images, "
                          f"{rate:.2f}/s, ETA {eta}  ")
        self.stream.flush()
        self.drawn = True

    def finish(self) -> None:
        if self.drawn:
            self.stream.write("\n")
            self.stream.flush()
            self.drawn = False


def setup_console(verbose: bool) -> ProgressBar | None:
    """Called once by the CLI after logging is configured; returns the live bar when stdout is a terminal."""
    if verbose:
        os.environ[VERBOSE_ENV] = "1"
    quiet_benign_warnings()
    progress = logging.getLogger(PROGRESS_LOGGER)
    progress.propagate = False
    if not sys.stdout.isatty():
        progress.setLevel(logging.WARNING)  # the periodic log line says the same in files and pipes
        return None
    bar = ProgressBar()
    progress.addHandler(bar)
    progress.setLevel(logging.INFO)
    for handler in logging.getLogger().handlers:  # a log line first clears the bar, which redraws below it
        handler.addFilter(ClearBar(bar))
    return bar


class ClearBar(logging.Filter):
    def __init__(self, bar: ProgressBar):
        super().__init__()
        self.bar = bar

    def filter(self, record: logging.LogRecord) -> bool:
        if self.bar.drawn:
            self.bar.stream.write("\r\033[K")
            self.bar.stream.flush()
            self.bar.drawn = False
        return True


def quiet_ray_data_console() -> None:
    """Ray Data's per-dataset INFO lines (execution plan, start, finish) stay in its ray-data.log file; its console
    handler shows warnings and errors only."""
    import ray.data  # noqa: F401 - importing it installs Ray Data's logging configuration

    if os.environ.get(VERBOSE_ENV):
        return
    for handler in logging.getLogger("ray.data").handlers:
        if type(handler).__name__ == "PlainRayHandler":
            handler.setLevel(logging.WARNING)
