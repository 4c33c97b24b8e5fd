"""Ctrl-C for every command: one line and exit status 130, even where a library would swallow it."""

from __future__ import annotations

import _thread
import gc
import signal
import threading

INTERRUPTED = threading.Event()  # set by Ctrl-C, even where a library would swallow the KeyboardInterrupt


def _in_finalizer(frame) -> bool:
    """Whether ``frame`` runs inside a ``__del__`` or a garbage-collection callback (JAX has one), at any
    depth, where Python prints an exception and drops it."""
    callbacks = {getattr(callback, "__code__", None) for callback in gc.callbacks}
    while frame is not None:
        if frame.f_code.co_name == "__del__" or frame.f_code in callbacks:
            return True
        frame = frame.f_back
    return False


def on_ctrl_c(signum, frame) -> None:
    """SIGINT: remember it, then raise KeyboardInterrupt as Python's own handler does, except inside a
    finalizer, where Python would print and drop it: there the signal is sent again a moment later, to land
    in ordinary code. Being a handler of our own, it also keeps asyncio.run (inside Orbax and others) from
    installing one that only cancels a task, which a library may catch and carry on."""
    INTERRUPTED.set()
    if _in_finalizer(frame):
        threading.Timer(0.01, _thread.interrupt_main, (signal.SIGINT,)).start()
        return
    raise KeyboardInterrupt
