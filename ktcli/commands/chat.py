"""Chat with a model: streamed replies, multi-turn history, per-turn timings. `--prompt` for scripts."""
from __future__ import annotations

import sys
from typing import Optional

import typer
from typing_extensions import Annotated

from . import options as o


def chat(profile: o.ProfileArg = None, model: o.Model = None, weights: o.Weights = None, dtype: o.Dtype = None,
         device: o.Device = None, num_layers: o.NumLayers = None, use_cuda_graph_kt: o.GraphKT = None,
         use_cuda_graph: o.Graph = None, graph_mode: o.GraphMode = None, max_seq_len: o.MaxLen = None,
         cpu_threads: o.Threads = None, fit: o.Fit = False,
         prompt: Annotated[Optional[str], typer.Option("--prompt", "-p", help="Answer this one message, print the timings and exit.")] = None,
         interactive: Annotated[bool, typer.Option("--interactive", "-i", help="Read turns line by line from stdin even when it is not a terminal.")] = False,
         system: Annotated[Optional[str], typer.Option("--system", help="System prompt.")] = None,
         max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", min=1, help="Reply length limit.")] = 256,
         temperature: Annotated[float, typer.Option(min=0.0, help="0 is greedy.")] = 0.0,
         top_k: Annotated[int, typer.Option("--top-k", min=0, help="0 keeps all tokens.")] = 0,
         top_p: Annotated[float, typer.Option("--top-p", min=0.0, max=1.0)] = 1.0,
         seed: Annotated[Optional[int], typer.Option(help="Sampling seed.")] = None,
         stop: Annotated[Optional[list[str]], typer.Option("--stop", help="Stop string (repeatable).")] = None,
         ignore_eos: Annotated[bool, typer.Option("--ignore-eos", help="Keep generating past end-of-sequence (up to -n).")] = False,
         think: Annotated[Optional[bool], typer.Option("--think/--no-think", help="Thinking mode, where the chat template supports it.", show_default=False)] = None,
         context_policy: Annotated[str, typer.Option("--context-policy", help="When the context is full: drop-oldest turns, or stop.")] = "drop-oldest"):
    from ..engine import GenerationConfig
    from ..engine.conversation import Conversation
    from ..errors import UsageError
    from ..report.chat_session import ChatSession
    from ..report.chat_ui import ChatUI
    from .run import load_engine
    if context_policy not in ("drop-oldest", "stop"):
        raise UsageError(f"--context-policy must be drop-oldest or stop, got {context_policy!r}",
                         "drop-oldest forgets old turns when the context is full; stop refuses the turn")
    one_shot = prompt is not None or (not interactive and not sys.stdin.isatty())
    if prompt is None and one_shot:
        prompt = sys.stdin.read().strip()
        if not prompt:
            raise UsageError("no prompt: stdin was empty", "pass --prompt TEXT, pipe text in, or use -i")
    v, built, engine = load_engine(o.run_flags(locals()), fit)
    ui = ChatUI(interactive=not one_shot)
    conv = Conversation(built.tokenizer, engine.max_len, system=system, thinking=think, policy=context_policy)
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                           seed=seed, stop=tuple(stop or ()), ignore_eos=ignore_eos)
    if not one_shot:
        ui.banner(v.source.name, engine.mode, built.timings["load"], engine.capture_s)
    ChatSession(engine, conv, ui, cfg, built.tokenizer).run(prompt if one_shot else None)
