"""What a user sees: the job's own lines on the terminal, everything else in the run's log file.

``run_job`` wraps a job's main: it opens ``logs/<job>-<time>.log``, points the process's stdout and
stderr (file descriptors 1 and 2, so C++ and subprocess output too) at that file, and keeps the
real terminal for the job's own lines, written with ``say``. Ray's and DeepSpeed's chatter, library
warnings and tracebacks land in the log file only. An error a user can cause (``PipelineError``)
ends as ``error: <message>``; any other failure as one line naming the log file that holds its
traceback.

Training workers send their progress lines to the driver through ``ProgressChannel`` (a Ray queue
actor), so each line reaches the terminal once, from the driver, whichever worker process wrote it
and however often the worker group restarted.
"""
from __future__ import annotations

import os
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from typing import Callable, Iterator, TextIO

from pipeline.errors import PipelineError

_active: "Console | None" = None


class Console:
    def __init__(self, out: TextIO, err: TextIO, log: TextIO, log_path: str) -> None:
        self.out, self.err, self.log, self.log_path = out, err, log, log_path
        self._lock = threading.Lock()

    def say(self, line: str, *, error: bool = False) -> None:
        from pipeline.redact import redact

        line = redact(line)
        with self._lock:
            (self.err if error else self.out).write(line + "\n")
            (self.err if error else self.out).flush()
            self.log.write(f"[console] {line}\n")
            self.log.flush()


def say(line: str, *, error: bool = False) -> None:
    """A line for the user: the terminal (and log file) inside ``run_job``, else plain stdout."""
    if _active is not None:
        _active.say(line, error=error)
    else:
        from pipeline.redact import redact

        print(redact(line), file=sys.stderr if error else sys.stdout, flush=True)


def default_log_path(job: str) -> str:
    folder = os.environ.get("COATNET_LOG_DIR", "logs")
    os.makedirs(folder, exist_ok=True)
    return os.path.abspath(os.path.join(folder, f"{job}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"))


@contextmanager
def captured(log_path: str) -> Iterator[Console]:
    """Send fds 1 and 2 to ``log_path`` for the duration; yield the Console that still reaches the
    terminal."""
    global _active
    sys.stdout.flush()
    sys.stderr.flush()
    log = open(log_path, "a", buffering=1)
    saved_out, saved_err = os.dup(1), os.dup(2)
    out = os.fdopen(os.dup(saved_out), "w", buffering=1)
    err = os.fdopen(os.dup(saved_err), "w", buffering=1)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    _active = Console(out, err, log, log_path)
    try:
        yield _active
    finally:
        _active = None
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved_out, 1)
        os.dup2(saved_err, 2)
        for f in (out, err, log):
            f.close()
        os.close(saved_out)
        os.close(saved_err)


def run_job(job: str, main: Callable[[], int]) -> int:
    """Run a job's body under a captured console; returns its exit code (2: user error, 1: bug)."""
    path = default_log_path(job)
    with captured(path) as con:
        con.say(f"log file       {path}")
        try:
            return main()
        except PipelineError as e:
            traceback.print_exc()
            con.say(f"error: {e}", error=True)
            con.say(f"(full log: {path})", error=True)
            return 2
        except KeyboardInterrupt:
            con.say(f"interrupted (full log: {path})", error=True)
            return 130
        except Exception as e:  # noqa: BLE001 - a bug: one line here, the traceback in the log
            traceback.print_exc()
            con.say(f"error: {root_cause(e)} (traceback in {path})", error=True)
            return 1


def root_cause(e: BaseException) -> str:
    """One line for an unexpected error. A worker-group failure (Ray Train) carries the workers'
    tracebacks in its message: name the innermost error raised there, not the wrapper."""
    import re

    text = str(e)
    raised = [m.group(0) for m in re.finditer(r"^(?:\S+\s)?[\w.]*(?:Error|Exception)\b[^\n]*$", text, re.M)
              if not m.group(0).lstrip().startswith(("File ", "raise "))]
    first = (text.strip().splitlines() or [""])[0]
    inner = raised[-1].split(") ", 1)[-1].strip() if raised else ""
    line = f"{type(e).__name__}: {first}" + (f" -> {inner}" if inner and inner not in first else "")
    return line[:400]


class ProgressChannel:
    """Worker -> driver lines. The driver creates it (a Ray queue actor, no CPU) and drains it in a
    thread while training runs; workers hold a copy (it pickles as the actor handle)."""

    def __init__(self) -> None:
        from ray.util.queue import Queue

        self.queue = Queue(actor_options={"num_cpus": 0})
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __getstate__(self):
        return {"queue": self.queue}

    def __setstate__(self, state):
        self.queue = state["queue"]
        self._stop, self._thread = None, None

    def send(self, line: str) -> None:
        """From a worker: never blocks, never fails the training step."""
        try:
            self.queue.put_nowait(line)
        except Exception:  # noqa: BLE001 - the driver went away: the line is in the worker log anyway
            pass

    def start(self) -> None:
        def drain() -> None:
            from ray.util.queue import Empty

            while True:
                try:
                    say(self.queue.get(block=True, timeout=0.5))
                except Empty:
                    if self._stop.is_set():
                        return
                except Exception:  # noqa: BLE001 - Ray shutting down
                    return
        self._thread = threading.Thread(target=drain, name="progress", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        try:
            self.queue.shutdown()
        except Exception:  # noqa: BLE001
            pass
