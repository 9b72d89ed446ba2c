"""The one batching loop behind every HTTP request: the engine runs on its own thread, requests join it between steps.

HTTP handlers (asyncio, rank 0) call submit() and cancel(), which only queue; the loop thread takes what is queued
before each engine step, so a new request joins the running batch at the next step and a cancelled one (a client
that went away, a stop string) frees its row. Each engine event is handed back to the handler's event loop.
Under torchrun every rank runs the same engine: before each step rank 0 broadcasts what joins and what leaves (a
Plan), and the followers apply it and step in lockstep; while idle rank 0 sends an empty plan every idle_s seconds so
no collective waits long enough to time out.
"""

from __future__ import annotations

import queue
import sys
import threading
import traceback
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from ..inference.constraints import Constraint, grammar_vocab, new_row_state
from ..inference.engine import Engine, Event, Request
from ..inference.loading import broadcast_object
from ..inference.sampling import SamplingParams


@dataclass
class Spec:
    """A request as it travels to every rank (picklable: no generator, no callbacks)."""

    key: int
    prompt: list
    max_new_tokens: int
    sampling: SamplingParams
    stop_ids: frozenset
    seed: Optional[int]
    adapter: Optional[str]
    constraint: Optional[Constraint] = None  # what the answer must match; each rank builds its own matcher


@dataclass
class Plan:
    """What changes before one step: requests that join, keys that leave, or the end of serving."""

    new: list = field(default_factory=list)
    cancel: list = field(default_factory=list)
    shutdown: bool = False


def apply_plan(engine: Engine, plan: Plan, tok=None) -> None:
    """tok: the tokenizer, whose vocabulary a constrained request's matcher is built on."""
    for spec in plan.new:
        gen = None
        if spec.seed is not None:  # its own generator: a seeded answer does not depend on who else is in the batch
            gen = torch.Generator(device=engine.device)
            gen.manual_seed(spec.seed)
        state = new_row_state(grammar_vocab(tok), spec.constraint) if spec.constraint is not None else None
        engine.submit(Request(spec.prompt, spec.max_new_tokens, spec.sampling, spec.stop_ids, gen, spec.adapter,
                              key=spec.key, constraint=state))
    for key in plan.cancel:
        engine.cancel(key)


def follow(engine: Engine, info, tok=None) -> None:
    """A non-zero rank under torchrun: apply rank 0's plans and step with it until it says stop."""
    while True:
        plan = broadcast_object(None, info)
        if plan.shutdown:
            return
        apply_plan(engine, plan, tok)
        engine.step()


class BatchLoop:
    """Rank 0's side: a thread that owns the engine; callbacks get each request's events on the loop thread."""

    def __init__(self, engine: Engine, info, idle_s: float = 1.0, tok=None):
        self.engine, self.info, self.idle_s, self.tok = engine, info, idle_s, tok
        self.inbox: queue.Queue = queue.Queue()  # ("new", Spec, callback) | ("cancel", key) | ("shutdown",)
        self.callbacks: dict[int, Callable[[Event], None]] = {}
        self.next_key = 0
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, name="minillama-batch-loop", daemon=True)

    def start(self) -> "BatchLoop":
        self.thread.start()
        return self

    def submit(self, prompt, max_new_tokens, sampling, stop_ids, seed, adapter, callback, constraint=None) -> int:
        """Queue a request (thread-safe); returns its key. callback(Event) runs on the loop thread."""
        with self.lock:
            key, self.next_key = self.next_key, self.next_key + 1
        self.inbox.put(("new", Spec(key, list(prompt), max_new_tokens, sampling, frozenset(stop_ids), seed, adapter,
                                    constraint), callback))
        return key

    def cancel(self, key: int) -> None:
        self.inbox.put(("cancel", key))

    def shutdown(self, timeout: float = 30.0) -> None:
        self.inbox.put(("shutdown",))
        self.thread.join(timeout)

    def stats(self) -> dict:
        return {"running": self.engine.n_running, "waiting": len(self.engine.waiting) + self.inbox.qsize()}

    def _take(self) -> Plan:
        """Everything queued now; when the engine has nothing to do, wait up to idle_s for the first item."""
        plan, block = Plan(), not self.engine.busy
        while True:
            try:
                item = self.inbox.get(block=block, timeout=self.idle_s if block else None)
            except queue.Empty:
                return plan
            block = False
            if item[0] == "new":
                plan.new.append(item[1])
                self.callbacks[item[1].key] = item[2]
            elif item[0] == "cancel":
                plan.cancel.append(item[1])
            else:
                plan.shutdown = True
                return plan

    def _run(self) -> None:
        while True:
            plan = self._take()
            if self.info.world_size > 1:
                broadcast_object(plan, self.info)
            if plan.shutdown:
                self.engine.cancel_all()
                return
            try:
                apply_plan(self.engine, plan, self.tok)
                for key in plan.cancel:
                    self.callbacks.pop(key, None)
                events = self.engine.step()
            except Exception as e:  # a bug or out of memory: fail what is running, keep serving
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

    def _fail_all(self, error: BaseException) -> None:
        running = [r for r in self.engine.rows if r is not None] + list(self.engine.waiting)
        self.engine.cancel_all()
        for req in running:
            cb = self.callbacks.pop(req.key, None)
            if cb is not None:
                cb(Event(req, None, "error"))
