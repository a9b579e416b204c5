"""Fixed robustness bugs, each pinned: worker jobs have identity, host-callback errors are all reported, the clocks
take concurrent updates, a sweep restores the thread count, a failed kernel build is said and recorded."""
import json
import os
import subprocess
import sys
import threading
import time

import pytest
import torch

from conftest import ROOT


def test_an_abandoned_job_never_leaks_into_the_next_callers_result():
    """A caller interrupted while waiting leaves its job running; the next caller gets its own outcome only."""
    from ktcli.ops.worker import worker
    w = worker()

    def slow_failure():
        time.sleep(0.2)
        raise ValueError("from the abandoned job")
    abandoned = w.submit(slow_failure)          # nobody waits for it: the caller was interrupted
    got = []
    w.run(lambda: got.append("mine"))           # must neither raise the other job's error nor return early
    assert got == ["mine"] and abandoned.done.is_set() and isinstance(abandoned.error, ValueError)
    with pytest.raises(KeyError):
        w.run(lambda: {}["x"])                  # its own error still reaches its caller


def test_every_host_callback_error_is_reported():
    from ktcli.ops.bridge import HostCallbackBridge
    b = HostCallbackBridge()
    b.errors += [ValueError("bad id 9"), ValueError("bad id 9"), MemoryError("scratch")]
    with pytest.raises(RuntimeError) as e:
        b.check()
    assert str(e.value) == ("CPU experts failed inside the CUDA graph (3 layer call(s)): ValueError('bad id 9'); "
                            "MemoryError('scratch')")
    assert isinstance(e.value.__cause__, ValueError) and b.errors == []
    b.check()                                   # cleared: the next step starts clean


def test_clocks_take_concurrent_updates():
    from ktcli.ops.clocks import Clock
    c = Clock("test")
    threads = [threading.Thread(target=lambda: [c.add(1.0) for _ in range(20000)]) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert c.take() == 80000.0 and c.take() == 0.0


def test_sweep_restores_the_thread_count_after_a_profile_that_sets_it(cli, tmp_path):
    text = open(os.path.join(ROOT, "profiles", "demo.yaml")).read()
    one, unset = tmp_path / "one-thread.yaml", tmp_path / "unset.yaml"
    one.write_text(text.replace("cpu_threads: 2", "cpu_threads: 1"))
    unset.write_text(text.replace("  cpu_threads: 2\n", ""))
    before = torch.get_num_threads()
    r = cli("bench", "-p", "4", "-n", "0", "-r", "1", "--warmup", "0", str(one), str(unset), "-o", "json")
    assert r.exit_code == 0, r
    assert [x["threads"] for x in json.loads(r.stdout)["results"]] == [1, before]
    assert torch.get_num_threads() == before


def test_a_failed_kernel_build_is_said_and_recorded(tmp_path):
    env = {**os.environ, "CC": "no-such-compiler", "KTCLI_CACHE": str(tmp_path)}
    run = lambda *a: subprocess.run([sys.executable, "-m", "ktcli", *a], env=env, capture_output=True, text=True,  # noqa: E731
                                    cwd=ROOT, timeout=300)
    r = run("bench", "-p", "0", "-n", "2", "-r", "1", "--warmup", "0")
    assert r.returncode == 0, r.stderr
    assert "note: CPU expert kernel unavailable (no C compiler (gcc) on PATH): CPU experts ran torch's path" in r.stdout
    c = run("chat", "--prompt", "Hi", "-n", "2")
    assert c.returncode == 0, c.stderr
    assert ("note: the CPU expert kernel is unavailable (no C compiler (gcc) on PATH); CPU experts run torch's "
            "path, 3-4x slower") in " ".join(c.stderr.split())


def test_results_files_follow_the_umask(tmp_path):
    from ktcli.files import write_atomic
    old = os.umask(0o022)
    try:
        write_atomic(str(tmp_path / "r.json"), "{}")
    finally:
        os.umask(old)
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o644


def test_replies_never_send_control_bytes_to_the_terminal():
    import io

    from ktcli.report.chat_ui import ChatUI
    ui = ChatUI(interactive=False)
    ui.out.file = io.StringIO()
    ui.piece("a\x0bb\x1ec\x1b[31md\ne\tf\x7f\x85")
    assert ui.out.file.getvalue() == "a␋b␞c␛[31md\ne\tf␡\ufffd"


def test_chat_prompt_has_line_editing_and_a_kept_history(tmp_path, monkeypatch):
    readline = pytest.importorskip("readline")
    from ktcli.report import chat_ui
    monkeypatch.setenv("KTCLI_CACHE", str(tmp_path))
    monkeypatch.setattr(chat_ui._line_editing, "done", False, raising=False)
    chat_ui._line_editing()
    assert readline.get_history_length() == 1000
