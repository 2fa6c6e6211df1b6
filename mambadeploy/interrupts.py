"""Prompt, clean interruption for the CLI: SIGINT and SIGTERM both remove the directories a command is still writing
(registered with `cleanup_on_interrupt`) and end the process with 128 + the signal number.

Why a watcher thread: Python runs its signal handlers in the main thread between bytecodes, so a long call into C
(tracing, protobuf serialisation) delayed Ctrl-C by ~18 s, and SIGTERM (the default action) killed the process with
its half-written export left behind. `signal.set_wakeup_fd` has the C-level handler write the signal number to a pipe
at once; a daemon thread blocked on that pipe removes the registered paths and exits.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

_paths: set[Path] = set()
_callbacks: list = []
_installed = False


@contextlib.contextmanager
def cleanup_on_interrupt(path):
    """Remove `path` if the process is interrupted (SIGINT / SIGTERM) while the block runs."""
    p = Path(path)
    _paths.add(p)
    try:
        yield p
    finally:
        _paths.discard(p)


@contextlib.contextmanager
def call_on_interrupt(fn):
    """Call fn() (e.g. stop a child server) if the process is interrupted while the block runs; before exiting."""
    _callbacks.append(fn)
    try:
        yield fn
    finally:
        _callbacks.remove(fn)


def install() -> None:
    """Called once by the CLI (never on import: a library must not take over its host's signals)."""
    global _installed
    if _installed or threading.current_thread() is not threading.main_thread():
        return
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    signal.set_wakeup_fd(write_fd)
    # Python-level handlers must exist for the C handler to write the wakeup byte; they do nothing, so the main thread
    # does not unwind (and deregister what it was writing) while the watcher removes it
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _ignore)
    threading.Thread(target=_watch, args=(read_fd,), daemon=True, name="mambadeploy-interrupts").start()
    _installed = True


def _ignore(signum, frame):
    pass


def _watch(read_fd: int) -> None:
    while True:
        data = os.read(read_fd, 1)
        if data and data[0] in (signal.SIGINT, signal.SIGTERM):
            break
    for fn in _callbacks:
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - still remove the paths and exit
            print(f"interrupted: cleanup failed: {exc}", file=sys.stderr, flush=True)
    for p in list(_paths):
        for _ in range(20):  # the main thread may still be adding files while the tree is removed
            shutil.rmtree(p, ignore_errors=True)
            if not p.exists():
                break
            time.sleep(0.05)
        print(f"interrupted: removed the unfinished {p}", file=sys.stderr, flush=True)
    print("interrupted", file=sys.stderr, flush=True)
    os._exit(128 + data[0])
