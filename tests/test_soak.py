"""A long chat stays bounded: 300 turns on the demo model in a small context keep Python's memory flat and the
process's close to it, and the drop-oldest policy frees enough room each time that most turns reuse the cached
prefix instead of re-prefilling.

RSS still creeps (~0.1 MB a turn, slowing: measured 545 → 567 MB from turn 100 to 400 after malloc_trim) while
Python's own allocations stay flat: torch's per-shape kernel caches grow with each new prompt length, up to
their caps. The bound below allows that, not a per-turn leak of the engine's own objects.
"""
import time
import tracemalloc

import psutil

from ktcli.commands.options import machine_for, profile_from_flags
from ktcli.commands.run import load
from ktcli.engine import Engine, GenerationConfig
from ktcli.engine.conversation import Conversation


def test_300_turns_keep_memory_flat_and_drop_rarely():
    prof = profile_from_flags(None, max_seq_len=256)
    _, built = load(prof, machine_for(None), need_tokenizer=True)
    engine = Engine(built)
    conv = Conversation(built.tokenizer, engine.max_len)
    cfg = GenerationConfig(max_new_tokens=4, ignore_eos=True)
    proc, rss, drops, prefilled, t0 = psutil.Process(), {}, 0, 0, time.monotonic()
    for turn in range(300):
        ids, dropped = conv.prompt(f"turn {turn}: tell me about experts and routers", reserve=cfg.max_new_tokens)
        new, st = engine.generate(ids, cfg)
        conv.commit(f"turn {turn}: tell me about experts and routers", built.tokenizer.decode(new), dropped)
        drops += bool(dropped)
        prefilled += st.prompt_tokens
        if turn == 100:
            tracemalloc.start()
        if turn in (100, 299):
            rss[turn] = (proc.memory_info().rss, tracemalloc.get_traced_memory()[0])
    assert time.monotonic() - t0 < 120
    tracemalloc.stop()
    assert rss[299][1] < 2 * 2**20, rss                    # Python objects made since turn 100 and still alive
    assert rss[299][0] - rss[100][0] < 48 * 2**20, rss     # the process: torch's capped caches only
    assert 5 <= drops <= 100, drops        # ~30 tokens a turn, half of 256 freed per drop: a drop every ~4 turns
    assert prefilled < 300 * engine.max_len // 3, prefilled   # most turns prefilled only their new tokens
