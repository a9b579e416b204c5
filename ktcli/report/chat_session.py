"""The chat loop: reads turns from the UI, runs slash commands from a table of small handlers, streams replies.

commands/chat.py parses flags, builds the engine and hands over to `ChatSession.run`.
"""
from __future__ import annotations

import signal

from ..engine import ContextFull
from .chat_ui import Detokenizer


class ChatSession:
    def __init__(self, engine, conv, ui, cfg, tokenizer):
        self.engine, self.conv, self.ui, self.cfg, self.tok = engine, conv, ui, cfg, tokenizer
        self.last = None                 # GenerationStats of the last reply
        self._interrupted = False

    # -- slash commands: each a small handler; COMMANDS below is the table /help prints ----------------------
    def help(self, arg):
        self.ui.info(help_text())

    def reset(self, arg):
        self.conv.turns = []
        self.engine.reset()
        self.ui.notice("conversation reset")

    def stats(self, arg):
        self.ui.stats(self.last, self.ui.out) if self.last else self.ui.notice("no reply yet")

    def system(self, arg):
        self.conv.system, self.conv.turns = arg or None, []
        self.ui.notice(f"system prompt {'set' if arg else 'cleared'}; conversation reset")

    def think(self, arg):
        if arg not in ("on", "off"):
            self.ui.notice("usage: /think on|off")
        elif not self.conv.supports_thinking:
            self.ui.notice("this model's chat template has no thinking mode")
        else:
            self.conv.thinking = arg == "on"
            self.ui.notice(f"thinking mode {arg}")

    def command(self, text: str) -> bool:
        """Runs a slash command; False when it ends the session."""
        cmd, _, arg = text.strip().partition(" ")
        if cmd in EXIT:
            return False
        entry = COMMANDS.get(cmd)
        if entry is None:
            self.ui.notice(f"unknown command {cmd}; /help lists them")
        else:
            getattr(self, entry[0])(arg.strip())
        return True

    # -- turns ------------------------------------------------------------------------------------------------
    def reply(self, text: str, one_shot: bool) -> None:
        try:
            ids, dropped = self.conv.prompt(text, reserve=min(self.cfg.max_new_tokens, max(self.engine.max_len // 4, 1)))
        except ContextFull as e:
            if one_shot:
                raise
            self.ui.notice(f"{e.message} — {e.hint}")
            return
        if dropped:
            self.ui.notice(f"context full: dropped the {dropped} oldest turn(s)")
        detok = Detokenizer(self.tok)
        self._interrupted = False
        old = None if one_shot else signal.signal(signal.SIGINT, self._on_sigint)   # Ctrl-C ends the reply only
        try:
            _, self.last = self.engine.generate(ids, self.cfg, on_token=lambda t: self.ui.piece(detok.push(t)),
                                                should_stop=lambda: self._interrupted)
        finally:
            if old is not None:
                signal.signal(signal.SIGINT, old)
        self.ui.end_reply(interrupted=self.last.stop_reason == "interrupted")
        self.conv.commit(text, detok.text(), dropped)
        self.ui.stats(self.last)

    def _on_sigint(self, *_):
        self._interrupted = True

    def run(self, prompt: str | None = None) -> None:
        """One reply to `prompt`, or turns from the UI until /exit or end of input."""
        if prompt is not None:
            return self.reply(prompt, one_shot=True)
        while True:
            text = self.ui.ask()
            if text is None:
                return
            if not text.strip():
                continue
            if text.strip().startswith("/"):
                if not self.command(text):
                    return
                continue
            self.reply(text, one_shot=False)


EXIT = ("/exit", "/quit")
COMMANDS = {                    # name → (handler, arguments, what it does)
    "/help": ("help", "", "this list"),
    "/reset": ("reset", "", "forget the conversation"),
    "/stats": ("stats", "", "timings of the last reply"),
    "/system": ("system", "TEXT", "set the system prompt (and reset)"),
    "/think": ("think", "on|off", "thinking mode (templates that support it)"),
}


def help_text() -> str:
    rows = [(f"{name} {args}".strip(), what) for name, (_, args, what) in COMMANDS.items()]
    rows.append(("/exit", "leave (Ctrl-D too); Ctrl-C stops a reply"))
    return "\n".join(f"{left:<14} {what}" for left, what in rows)
