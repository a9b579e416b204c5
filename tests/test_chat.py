"""ktcli chat on the embedded default model, scripted through CliRunner."""
from conftest import profile


def test_one_shot_prompt(cli):
    r = cli("chat", "--prompt", "Hello!", "-n", "8")
    assert r.exit_code == 0, r
    assert r.stdout.strip()                       # the reply
    for line in ("prompt eval count:", "prompt eval rate:", "eval count:", "eval rate:", "token latency:"):
        assert line in r.stderr


def test_stdin_prompt_when_not_a_terminal(cli):
    r = cli("chat", "-n", "4", "--ignore-eos", input="What is an expert?\n")
    assert r.exit_code == 0, r
    assert "eval count:           3 token(s)" in r.stderr   # 4 tokens: the first comes from the prefill


def test_empty_stdin_is_an_error(cli):
    r = cli("chat", input="")
    assert r.exit_code == 2 and "Error: no prompt: stdin was empty" in r.output


def test_scripted_multi_turn_session(cli):
    script = "Hello!\nTell me more.\n/stats\n/reset\n/system Be brief.\n/think on\n/think\nAgain\n/bogus\n/help\n/exit\nnever\n"
    r = cli("chat", "-i", "-n", "6", input=script)
    assert r.exit_code == 0, r
    assert r.stderr.count("\neval rate:") == 3           # three replies, then /exit stops the session
    assert r.stdout.count("prompt eval count:") == 1   # /stats prints to stdout
    assert "conversation reset" in r.stderr
    assert "system prompt set; conversation reset" in r.stderr
    assert "thinking mode on" in r.stderr
    assert "unknown command /bogus; /help lists them" in r.stderr
    assert "usage: /think on|off" in r.stderr
    assert "/reset         forget the conversation" in r.stdout
    assert "/think on|off  thinking mode (templates that support it)" in r.stdout


def test_eof_ends_session(cli):
    r = cli("chat", "-i", "-n", "3", input="Hi\n")
    assert r.exit_code == 0 and r.stderr.count("\neval rate:") == 1


def test_over_long_prompt(cli):
    long = "experts " * 400
    r = cli("chat", "--max-seq-len", "128", "--prompt", long)
    assert r.exit_code == 2
    assert r.stderr.startswith("Error: context full: this turn needs")
    r = cli("chat", "-i", "--max-seq-len", "128", "-n", "4", input=f"{long}\nHi\n")
    assert r.exit_code == 0
    assert "context full" in r.stderr and r.stderr.count("\neval rate:") == 1


def test_context_drops_oldest_turns(cli):
    turns = "".join(f"turn {i} about the router and the experts\n" for i in range(8))
    r = cli("chat", "-i", "--max-seq-len", "160", "-n", "16", input=turns)
    assert r.exit_code == 0, r
    assert "context full: dropped the" in r.stderr and r.stderr.count("\neval rate:") == 8
    r = cli("chat", "-i", "--max-seq-len", "160", "-n", "16", "--context-policy", "stop", input=turns)
    assert r.exit_code == 0 and "context full: this turn needs" in r.stderr


def test_bad_flags(cli):
    r = cli("chat", "--context-policy", "forget", "--prompt", "x")
    assert r.exit_code == 2 and "Error: --context-policy must be drop-oldest or stop, got 'forget'" in r.output
    r = cli("chat", "--temperature", "-1", "--prompt", "x")
    assert r.exit_code == 2
    r = cli("chat", "--dtype", "float8", "--prompt", "x")
    assert r.exit_code == 2 and "Error: --dtype must be one of bfloat16, float16, float32, got 'float8'" in r.output


def test_chat_refuses_a_failing_profile_before_loading(cli):
    r = cli("chat", profile("qwen2-57b-a14b-gpu01-graphs-broken.yaml"), "--prompt", "x")
    assert r.exit_code == 1
    import torch
    first = ("CUDA graphs are on (graph_mode full), but layers 0-1 decode with operator 'torch'"
             if torch.cuda.is_available() else "device cuda:0 is not on this machine (it has cpu) (and 2 more")
    assert first in r.stderr
    assert "Hint:" in r.stderr and "Traceback" not in r.output


def test_thinking_toggle_changes_the_prompt():
    from ktcli.model.demo import ensure_demo
    from ktcli.engine.conversation import Conversation
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(ensure_demo())
    conv = Conversation(tok, 512)
    assert conv.supports_thinking
    default = conv.encode(conv.messages("hi"))
    conv.thinking = False
    off = conv.encode(conv.messages("hi"))
    assert off[: len(default)] == default and len(off) > len(default)
    assert "<think>" in tok.decode(off[len(default):])


def test_ctrl_c_stops_the_reply_not_the_session(tmp_path):
    """SIGINT during a reply ends that reply; the session reads the next line and exits cleanly."""
    import os
    import signal
    import subprocess
    import sys
    import threading
    import time
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    p = subprocess.Popen([sys.executable, "-m", "ktcli", "chat", "-i", "-n", "2000", "--ignore-eos", "--max-seq-len", "4096"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    got = []
    reader = threading.Thread(target=lambda: got.append(p.stdout.read()), daemon=True)
    p.stdin.write(b"Hello!\n")
    p.stdin.flush()
    first = p.stdout.read(1)            # the reply has started streaming
    reader.start()
    time.sleep(0.3)
    p.send_signal(signal.SIGINT)
    time.sleep(0.5)
    p.stdin.write(b"/exit\n")
    p.stdin.flush()
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 0, err
    assert first and "[reply stopped]" in err
    assert err.count("\neval count:") == 1 and "Traceback" not in err


def test_sampling_and_prompt_flags(cli):
    args = ["chat", "--prompt", "Hello!", "-n", "12", "--ignore-eos", "--temperature", "0.8", "--top-k", "20",
            "--top-p", "0.9", "--seed", "3", "--system", "Be brief.", "--no-think"]
    a, b = cli(*args), cli(*args)
    assert a.exit_code == 0 and a.stdout == b.stdout          # seeded sampling repeats
    c = cli(*args[:-5], "--seed", "4")
    assert c.exit_code == 0
    assert "eval count:           11 token(s)" in a.stderr   # --ignore-eos runs to -n (first token is prefill's)


def test_stop_string_flag(cli):
    full = cli("chat", "--prompt", "Hello!", "-n", "12", "--ignore-eos")
    text = full.stdout.strip()
    # two letters from the second half (the random demo model also emits control characters, shown as pictures)
    at = next(i for i in [*range(len(text) // 2, len(text) - 1), *range(len(text) - 1)] if text[i:i + 2].isalnum())
    stop = text[at:at + 2]
    cut = cli("chat", "--prompt", "Hello!", "-n", "12", "--ignore-eos", "--stop", stop).stdout.strip()
    # the reply ends at the token completing the stop string (exact cut: tests/test_engine.py::test_stops)
    assert text.startswith(cut) and stop in cut and len(cut) < len(text)


def test_chat_refuses_a_config_only_model_before_loading(cli):
    r = cli("chat", "--model", "qwen3-30b-a3b", "--num-layers", "1", "--device", "cpu", "--prompt", "x")
    assert r.exit_code == 4
    assert r.stderr.startswith("Error: qwen3-30b-a3b is an architecture config without a checkpoint or tokenizer")
