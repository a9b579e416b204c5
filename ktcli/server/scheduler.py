"""One engine serves one request at a time, in arrival order, on its own thread; a bounded queue in front of it.

A job streams text pieces back through `emit` (called on the engine thread) and holds back the tail that could
still become a stop string, so no stop string ever reaches the client. Setting `job.cancel` (client gone) ends its
generation at the next token.
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass

from ..engine import GenerationConfig
from ..report.chat_ui import Detokenizer


@dataclass
class Stats:
    """What a response reports: GenerationStats plus the tokens reused from the previous request's cache."""
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    decode_tokens: int
    prefill_s: float
    decode_s: float
    prompt_tps: float
    decode_tps: float


class Job:
    def __init__(self, ids: list, cfg: GenerationConfig, stops: tuple, emit, stream: bool = True):
        self.ids, self.cfg, self.stops, self.emit = ids, cfg, stops, emit
        self.stream = stream     # False: the text goes out once at the end (no event-loop wake-up per token)
        self.cancel = threading.Event()

    def run(self, engine, tokenizer, tok_lock) -> None:
        if self.cancel.is_set():
            return self.emit("done", "cancelled", None)
        detok, state = Detokenizer(tokenizer), {"full": "", "sent": 0, "stopped": False}
        hold = max((len(s) for s in self.stops), default=1) - 1

        def on_token(tid):
            with tok_lock:                   # the request handlers encode with the same tokenizer
                state["full"] += detok.push(tid)
            full = state["full"]
            hits = [full.find(s, max(state["sent"] - hold, 0)) for s in self.stops]
            hits = [h for h in hits if h >= 0]
            end = min(hits) if hits else len(full) - hold
            if hits:
                state["stopped"] = True
                state["full"] = full[:end]
            if end > state["sent"] and self.stream:
                self.emit("text", full[state["sent"]:end], None)
                state["sent"] = end

        new, st = engine.generate(self.ids, self.cfg, on_token=on_token,
                                  should_stop=lambda: state["stopped"] or self.cancel.is_set())
        if len(state["full"]) > state["sent"]:      # the rest (all of it without streaming), cut at a stop string
            self.emit("text", state["full"][state["sent"]:], None)
        finish = "stop" if state["stopped"] or st.stop_reason == "eos" else \
            "cancelled" if st.stop_reason == "interrupted" else "length"
        self.emit("done", finish, Stats(st.prompt_tokens, engine.reused, len(new), st.decode_tokens, st.prefill_s,
                                        st.decode_s, st.prompt_tps, st.decode_tps))


class Scheduler:
    def __init__(self, engine, tokenizer, max_queue: int = 8):
        self.engine, self.tokenizer, self.max_queue = engine, tokenizer, max_queue
        # Hugging Face's fast tokenizers are not meant to be used from two threads at once (encode may change
        # their settings): the handlers' encodes and the engine thread's decodes take this lock.
        self.tok_lock = threading.Lock()
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._lock, self.pending = threading.Lock(), 0     # running + waiting
        threading.Thread(target=self._loop, name="ktcli-serve-engine", daemon=True).start()

    def submit(self, job: Job) -> bool:
        """Queue `job`; False when `max_queue` requests already wait behind the running one."""
        with self._lock:
            if self.pending > self.max_queue:
                return False
            self.pending += 1
        self._jobs.put(job)
        return True

    def _loop(self):
        while True:
            job = self._jobs.get()
            try:
                job.run(self.engine, self.tokenizer, self.tok_lock)
            except BaseException as e:     # noqa: BLE001 — reported to that request; the server goes on
                job.emit("error", e, None)
            finally:
                with self._lock:
                    self.pending -= 1
