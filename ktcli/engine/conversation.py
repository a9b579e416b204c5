"""Multi-turn history → prompt tokens via the tokenizer's chat template, with a context policy."""
from __future__ import annotations

from dataclasses import dataclass, field

from .generate import ContextFull


@dataclass
class Conversation:
    tokenizer: object
    max_len: int
    system: str | None = None
    thinking: bool | None = None          # None: the template's default
    policy: str = "drop-oldest"           # or "stop"
    turns: list = field(default_factory=list)   # [(user, assistant)]

    @property
    def supports_thinking(self) -> bool:
        return "enable_thinking" in (getattr(self.tokenizer, "chat_template", None) or "")

    def messages(self, user: str, turns=None) -> list:
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        for u, a in (self.turns if turns is None else turns):
            msgs += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
        return msgs + [{"role": "user", "content": user}]

    def encode(self, msgs) -> list:
        kw = {"enable_thinking": self.thinking} if self.thinking is not None and self.supports_thinking else {}
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, **kw)
        else:   # a base model: plain concatenation
            text = "\n".join(m["content"] for m in msgs)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def prompt(self, user: str, reserve: int):
        """Token ids for the next turn, and how many old turns were dropped to fit `reserve` new tokens. When the
        oldest turns must go, enough go to leave half the context free, so the next turns fit without dropping
        (and without re-prefilling the whole history) again."""
        if not user.strip():
            raise ContextFull("the message is empty", "type something, or /help")
        turns = list(self.turns)
        ids = self.encode(self.messages(user, turns))
        fits = lambda ids, turns, room: len(ids) + reserve <= room or (  # noqa: E731
            len(ids) < self.max_len and not turns and reserve)
        if fits(ids, turns, self.max_len):
            return ids, 0
        while turns and self.policy != "stop":
            turns.pop(0)
            ids = self.encode(self.messages(user, turns))
            if fits(ids, turns, self.max_len // 2):
                break
        if not fits(ids, turns, self.max_len):
            raise ContextFull(f"context full: this turn needs {len(ids)} prompt tokens + {reserve} for the "
                              f"reply; the context holds {self.max_len}",
                              "/reset, a shorter message, or a larger --max-seq-len")
        return ids, len(self.turns) - len(turns)

    def commit(self, user: str, reply: str, dropped: int) -> None:
        self.turns = self.turns[dropped:] + [(user, reply)]
