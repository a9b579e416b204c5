"""ktcli serve: the embedded demo on a free loopback port, driven by the official openai client and raw HTTP."""
import json
import os
import re
import subprocess
import sys
import threading
import time

import httpx
import psutil
import pytest
from openai import OpenAI

from conftest import ROOT

MODEL = "demo-v1"


class Running:
    def __init__(self, *args):
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "ktcli", "serve", "--port", "0", *args], cwd=ROOT, env=env,
                                     stderr=subprocess.PIPE, text=True)
        deadline, line = time.monotonic() + 120, ""
        while time.monotonic() < deadline:
            line += self.proc.stderr.readline()
            m = re.search(r"http://127\.0\.0\.1:(\d+)/v1", line.replace("\n", ""))
            if m:
                break
            assert self.proc.poll() is None, line
        self.url = f"http://127.0.0.1:{m.group(1)}"
        threading.Thread(target=self.proc.stderr.read, daemon=True).start()   # keep the pipe drained

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server():
    s = Running("--max-queue", "1")
    yield s
    s.stop()


@pytest.fixture
def client(server):
    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def ask(client, content="Hello!", **kw):
    kw.setdefault("max_tokens", 12)
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}], **kw)


def test_chat_completion(client):
    r = ask(client, seed=1)
    assert r.object == "chat.completion" and r.model == MODEL and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason in ("length", "stop") and r.usage.completion_tokens >= 1
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    t = r.model_extra["timings"]
    assert t["prompt_n"] + t["cache_n"] == r.usage.prompt_tokens and t["predicted_per_second"] > 0


def test_streaming_equals_the_whole_reply_and_seeds_repeat(client):
    whole = ask(client, seed=5, temperature=0.9).choices[0].message.content
    assert ask(client, seed=5, temperature=0.9).choices[0].message.content == whole
    chunks = list(ask(client, seed=5, temperature=0.9, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole
    assert chunks[-1].choices[0].finish_reason in ("length", "stop") and chunks[-1].usage.completion_tokens >= 1
    others = {ask(client, seed=s, temperature=0.9).choices[0].message.content for s in (6, 7, 8)}
    assert others != {whole}


def test_multi_turn_reuses_the_cached_prefix(client):
    first = ask(client, "Tell me about experts.", seed=2)
    msgs = [{"role": "user", "content": "Tell me about experts."},
            {"role": "assistant", "content": first.choices[0].message.content},
            {"role": "user", "content": "And routers?"}]
    second = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=4, seed=2)
    t = second.model_extra["timings"]
    assert t["cache_n"] >= first.usage.prompt_tokens - 1 and t["prompt_n"] < second.usage.prompt_tokens


def test_stop_strings_end_the_reply_before_them(client):
    full = ask(client, max_tokens=24, seed=3).choices[0].message.content
    at = next(i for i in range(len(full) // 2, len(full) - 1) if full[i:i + 2].isalnum())
    stop = full[at:at + 2]
    cut = ask(client, max_tokens=24, seed=3, stop=[stop, "never-seen"])
    assert cut.choices[0].message.content == full[:full.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in ask(client, max_tokens=24, seed=3, stop=stop, stream=True))
    assert streamed == full[:full.index(stop)]


def test_completions_models_and_health(client, server):
    r = client.completions.create(model=MODEL, prompt="The router picks", max_tokens=5, seed=1)
    assert r.object == "text_completion" and isinstance(r.choices[0].text, str) and r.usage.completion_tokens >= 1
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


BAD = [   # (body, status, param, code) — one line a case
    (b"{not json", 400, None, "invalid_json"),
    ({"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}, 404, "model", "model_not_found"),
    ({"messages": [{"role": "user", "content": "x"}]}, 400, "model", "missing_required_parameter"),
    ({"model": MODEL, "messages": []}, 400, "messages", "invalid_value"),
    ({"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role", "invalid_value"),
    ({"model": MODEL, "messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content", "invalid_type"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 5000}, 400, "max_tokens",
     "context_length_exceeded"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, 400, "temperature",
     "invalid_type"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, 400, "max_tokens",
     "invalid_value"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stop": [""]}, 400, "stop", "invalid_type"),
    ([1, 2], 400, None, "invalid_json"),
]


@pytest.mark.parametrize("body,status,param,code", BAD)
def test_bad_requests_get_an_openai_error(server, body, status, param, code):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(server.url + "/v1/chat/completions", content=data, headers={"content-type": "application/json"})
    err = r.json()["error"]
    assert (r.status_code, err["param"], err["code"]) == (status, param, code), err
    assert err["message"] and err["type"]
    assert httpx.get(server.url + "/health").json()["status"] == "ok"     # and the server carries on


def test_two_clients_are_answered_in_arrival_order(client):
    done = []

    def one(name, delay):         # 60 tokens without EOS: the second arrives while the first is running
        time.sleep(delay)
        ask(client, max_tokens=60, seed=1, extra_body={"ignore_eos": True})
        done.append(name)
    threads = [threading.Thread(target=one, args=("first", 0)), threading.Thread(target=one, args=("second", 0.3))]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert done == ["first", "second"]


def test_a_disconnected_stream_stops_its_generation(client, server):
    with httpx.stream("POST", server.url + "/v1/chat/completions", json={
            "model": MODEL, "messages": [{"role": "user", "content": "Go on"}], "max_tokens": 900, "stream": True,
            "seed": 1, "ignore_eos": True}) as r:
        lines = [line for _, line in zip(range(6), r.iter_lines())]
    assert any(line.startswith("data: ") for line in lines)
    t0 = time.monotonic()
    r = ask(client, max_tokens=2)          # served next: the abandoned 900-token reply was stopped
    assert r.choices[0].message.content is not None and time.monotonic() - t0 < 3.0


def test_a_full_queue_answers_429():
    """One request running and --max-queue 1 waiting: the next gets 429 with an OpenAI error object. In process,
    with an engine that holds each request until released, so the timing is certain."""
    import types

    from starlette.testclient import TestClient

    from ktcli.model.demo import ensure_demo
    from ktcli.server.app import Server
    from transformers import AutoTokenizer
    release = threading.Event()

    class HeldEngine:
        max_len, reused = 256, 0

        def generate(self, ids, cfg, on_token=None, should_stop=None):
            release.wait(30)
            st = types.SimpleNamespace(prompt_tokens=len(ids), decode_tokens=0, prefill_s=0.0, decode_s=0.0,
                                       prompt_tps=0.0, decode_tps=0.0, stop_reason="length")
            return [], st
    server = Server(HeldEngine(), AutoTokenizer.from_pretrained(ensure_demo()), MODEL, max_queue=1)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Go on"}], "max_tokens": 4}
    with TestClient(server.app) as http:
        threads = [threading.Thread(target=http.post, args=("/v1/chat/completions",), kwargs={"json": body})
                   for _ in range(2)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while http.get("/health").json()["queued"] < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        r = http.post("/v1/chat/completions", json=body)
        release.set()
        for t in threads:
            t.join()
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
    assert r.json()["error"]["type"] == "rate_limit_error"


def test_200_requests_keep_the_server_flat(client, server):
    proc = psutil.Process(server.proc.pid)
    for i in range(220):
        ask(client, f"request {i}", max_tokens=2, seed=i)
        if i == 19:
            start = proc.memory_info().rss
    assert proc.memory_info().rss - start < 48 * 2**20


def test_api_key_and_hosts(tmp_path):
    r = subprocess.run([sys.executable, "-m", "ktcli", "serve", "--host", "0.0.0.0"], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "Error: --host 0.0.0.0 is reachable from other machines: it needs --api-key" in r.stderr
    s = Running("--api-key", "sesame")
    try:
        assert httpx.get(s.url + "/v1/models").status_code == 401
        ok = OpenAI(base_url=s.url + "/v1", api_key="sesame", max_retries=0)
        assert [m.id for m in ok.models.list().data] == [MODEL]
    finally:
        s.stop()


def test_a_taken_port_is_refused_before_loading():
    import socket
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        r = subprocess.run([sys.executable, "-m", "ktcli", "serve", "--port", str(port)], cwd=ROOT,
                           capture_output=True, text=True, timeout=60)
    finally:
        taken.close()
    assert r.returncode == 2 and f"Error: cannot listen on 127.0.0.1:{port}: Address already in use" in r.stderr
    assert "loading" not in r.stderr
