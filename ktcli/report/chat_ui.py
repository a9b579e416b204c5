"""The chat's screen: streaming text, notices and the per-turn timing lines. The chat loop never renders."""
from __future__ import annotations

import os
import sys

from rich.console import Console
from rich.markup import escape

from ..ops.clocks import fixed_cost_us


# Control characters a model may emit (ESC, \v, \x1e, …) are shown as their Unicode pictures (␛, ␋, ␞), never sent
# to the terminal raw: an escape sequence from a model must not move the cursor or recolour the screen.
VISIBLE = ({c: 0x2400 + c for c in range(32) if chr(c) not in "\n\t"} | {0x7f: 0x2421}
           | {c: 0xfffd for c in range(0x80, 0xa0)})
PROMPT = "\001\033[1;32m\002>>> \001\033[0m\002"   # \001…\002: readline counts only the visible width


def _line_editing():
    """Arrow keys, line editing and a history kept across sessions (readline, where Python has it)."""
    if getattr(_line_editing, "done", False):
        return
    _line_editing.done = True
    try:
        import atexit
        import readline
    except ImportError:
        return
    from ..files import cache_root
    path = os.path.join(cache_root(), "chat_history")
    try:
        readline.read_history_file(path)
    except OSError:
        pass
    readline.set_history_length(1000)

    def save():
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            readline.write_history_file(path)
        except OSError:
            pass
    atexit.register(save)


class Detokenizer:
    """Incremental decode: emit only what is new, hold back a partial UTF-8 character."""

    def __init__(self, tokenizer):
        self.tok, self.ids, self.sent = tokenizer, [], 0

    def push(self, tid: int) -> str:
        self.ids.append(tid)
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        out, self.sent = text[self.sent:], len(text)
        return out

    def text(self) -> str:
        return self.tok.decode(self.ids, skip_special_tokens=True)


class ChatUI:
    def __init__(self, interactive: bool):
        self.interactive = interactive
        self.out = Console(highlight=False, soft_wrap=True)
        self.err = Console(stderr=True, highlight=False, soft_wrap=True)

    def banner(self, name, mode, load_s, capture_s):
        cap = f", graph capture {capture_s:.2f}s" if mode != "off" else ""
        self.err.print(f"[bold]{escape(name)}[/] loaded in {load_s:.2f}s (graphs {mode}{cap}). /help for commands.")

    def ask(self) -> str | None:
        try:
            if self.interactive and sys.stdin.isatty():
                _line_editing()
                return input(PROMPT)
            line = sys.stdin.readline()
            return None if line == "" else line.rstrip("\n")
        except EOFError:              # Ctrl-D: leave the shell's prompt on a line of its own
            if sys.stdin.isatty():
                self.out.file.write("\n")
            return None
        except KeyboardInterrupt:   # Ctrl-C at the prompt: keep the session, say how to leave
            self.err.print("\n[dim](/exit or Ctrl-D to leave)[/]")
            return ""

    def piece(self, text: str):
        self.out.file.write(text.translate(VISIBLE))
        self.out.file.flush()

    def end_reply(self, interrupted=False):
        self.piece("\n")
        if interrupted:
            self.err.print("[yellow]" + escape("[reply stopped]") + "[/]")

    def notice(self, text: str):
        self.err.print(f"[yellow]{escape(text)}[/]")

    def info(self, text: str):
        self.out.print(escape(text))

    def stats(self, st, console=None):
        c = console or self.err
        lines = [("prompt eval count", f"{st.prompt_tokens} token(s)"),
                 ("prompt eval duration", f"{st.prefill_s:.3f}s"),
                 ("prompt eval rate", f"{st.prompt_tps:.2f} tokens/s"),
                 ("eval count", f"{st.decode_tokens} token(s)"),
                 ("eval duration", f"{st.decode_s:.3f}s"),
                 ("eval rate", f"{st.decode_tps:.2f} tokens/s"),
                 ("token latency", f"p50 {st.latency_ms(.5):.1f} ms, p90 {st.latency_ms(.9):.1f} ms, "
                                   f"p99 {st.latency_ms(.99):.1f} ms")]
        if st.decode_tokens:
            n = st.decode_tokens / 1e3
            cpu, gpu = st.cpu_experts_s / n, st.gpu_wait_s / n
            rest = max(st.decode_s / n - cpu - gpu, 0.0)
            gpu_txt = "GPU inside the graph" if st.graph_mode == "full" else f"waiting for GPU {gpu:.2f} ms"
            lines.append(("decode per token", f"CPU experts {cpu:.2f} ms, {gpu_txt}, transfers + launch + other "
                                              f"{rest:.2f} ms (graphs {st.graph_mode})"))
            fixed = fixed_cost_us(vars(st))
            if fixed is not None:
                lines.append(("CPU-expert layers", f"{st.cpu_layer_calls / st.decode_tokens:.0f} per token, kernel "
                                                   f"{st.kernel_s / n:.2f} ms, {fixed:.0f} µs each outside the kernel"))
        mem = f"host {st.peak_host_bytes / 2**30:.2f} GiB"
        if st.peak_gpu_bytes:
            mem = f"GPU {st.peak_gpu_bytes / 2**30:.2f} GiB, " + mem
        lines.append(("peak memory", mem))
        for k, v in lines:
            c.print(f"[dim]{k + ':':<22}[/]{v}")
