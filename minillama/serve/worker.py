"""The one batching loop behind every HTTP request: the engine runs on one thread, requests join it between steps.

generate/serve.py runs the loop on the process's main thread and the HTTP server on another: on this project's CPU
a decode step run from a second thread took 1.4x (1 row) to 2.4x (4 rows) as long as from the main thread, MKL's
small matrix products (under torch 2.13's OpenMP) running at about half speed there; start() runs it on a thread of
its own (tests). HTTP handlers (asyncio, rank 0) call submit() and cancel(), which only queue; the loop takes what is
queued before each engine step, so a new request joins the running batch at the next step and a cancelled one (a client
that went away, a stop string) frees its row. Each engine event is handed back to the handler's event loop.
Under torchrun every rank runs the same engine: before each step rank 0 broadcasts what joins and what leaves
(Changes: the Requests themselves, and keys), and the followers apply them and step in lockstep; while idle rank 0
sends empty Changes every idle_s seconds so no collective waits long enough to time out.
"""

from __future__ import annotations

import queue
import sys
import threading
import traceback
from dataclasses import dataclass, field
from typing import Callable

from ..inference.engine import Engine
from ..inference.request import Event, Request
from ..inference.loading import broadcast_object


@dataclass
class Changes:
    """What changes before one step: requests that join, keys that leave, or the end of serving."""

    new: list = field(default_factory=list)  # Requests (picklable: the engine makes their generators)
    cancel: list = field(default_factory=list)
    shutdown: bool = False


def apply_changes(engine: Engine, changes: Changes) -> list[tuple[Request, Exception]]:
    """Queue the new requests and cancel the leavers; returns the requests that could not join (each fails alone,
    the others go on)."""
    failed = []
    for req in changes.new:
        try:
            engine.submit(req)
        except Exception as e:
            failed.append((req, e))
    for key in changes.cancel:
        engine.cancel(key)
    return failed


def follow(engine: Engine, info) -> None:
    """A non-zero rank under torchrun: apply rank 0's changes and step with it until it says stop."""
    while True:
        changes = broadcast_object(None, info)
        if changes.shutdown:
            return
        apply_changes(engine, changes)
        engine.step()


class BatchLoop:
    """Rank 0's side: the loop that owns the engine (run() on the calling thread, or start() on a new one);
    callbacks get each request's events on the loop's thread."""

    def __init__(self, engine: Engine, info, idle_s: float = 1.0):
        self.engine, self.info, self.idle_s = engine, info, idle_s
        self.inbox: queue.Queue = queue.Queue()  # ("new", Request, callback) | ("cancel", key) | ("shutdown",)
        self.callbacks: dict[object, Callable[[Event], None]] = {}
        self.thread = threading.Thread(target=self._run, name="minillama-batch-loop", daemon=True)

    def start(self) -> "BatchLoop":
        self.thread.start()
        return self

    def run(self) -> None:
        """Run the loop on the calling thread until stop() (or shutdown()) is called from another thread or a
        signal handler."""
        self._run()

    def stop(self) -> None:
        """Ask the loop to cancel what runs and return (thread-safe, signal-safe: it only queues)."""
        self.inbox.put(("shutdown",))

    def submit(self, req: Request, callback: Callable[[Event], None]):
        """Queue a request (thread-safe); returns its key. callback(Event) runs on the loop thread."""
        self.inbox.put(("new", req, callback))
        return req.key

    def cancel(self, key: int) -> None:
        self.inbox.put(("cancel", key))

    def shutdown(self, timeout: float = 30.0) -> None:
        """stop(), and wait for the loop's own thread (start()) to end."""
        self.stop()
        if self.thread.is_alive():
            self.thread.join(timeout)

    def stats(self) -> dict:
        return {"running": self.engine.n_running, "waiting": len(self.engine.waiting) + self.inbox.qsize()}

    def _take(self) -> Changes:
        """Everything queued now; when the engine has nothing to do, wait up to idle_s for the first item."""
        changes, block = Changes(), not self.engine.busy
        while True:
            try:
                item = self.inbox.get(block=block, timeout=self.idle_s if block else None)
            except queue.Empty:
                return changes
            block = False
            if item[0] == "new":
                changes.new.append(item[1])
                self.callbacks[item[1].key] = item[2]
            elif item[0] == "cancel":
                changes.cancel.append(item[1])
            else:
                changes.shutdown = True
                return changes

    def _run(self) -> None:
        while True:
            changes = self._take()
            if self.info.world_size > 1:
                broadcast_object(changes, self.info)
            if changes.shutdown:
                self.engine.cancel_all()
                return
            for req, e in apply_changes(self.engine, changes):
                print(f"[request {req.key} failed to start: {type(e).__name__}: {e}]", file=sys.stderr, flush=True)
                self._fail(req)
            for key in changes.cancel:
                self.callbacks.pop(key, None)
            try:
                events = self.engine.step()  # a request whose own prefill fails ends alone, as an "error" event
            except Exception as e:  # a bug or out of memory in the shared decode step
                traceback.print_exc(file=sys.stderr)
                self._fail_all(e)
                if self.info.world_size > 1:
                    raise  # the ranks are out of lockstep now
                continue
            for ev in events:
                cb = self.callbacks.get(ev.request.key)
                if ev.finish is not None:
                    self.callbacks.pop(ev.request.key, None)
                if cb is not None:
                    cb(ev)

    def _fail(self, req: Request) -> None:
        cb = self.callbacks.pop(req.key, None)
        if cb is not None:
            cb(Event(req, None, "error"))

    def _fail_all(self, error: BaseException) -> None:
        running = [r for r in self.engine.rows if r is not None] + list(self.engine.waiting)
        self.engine.cancel_all()
        for req in running:
            cb = self.callbacks.pop(req.key, None)
            if cb is not None:
                cb(Event(req, None, "error"))
