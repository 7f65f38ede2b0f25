"""The server's life cycle and its defences: engine death, draining on SIGTERM, stalled clients, huge bodies, foreign origins.

Engine death and SIGTERM each get a server of their own (they end it); the rest share one module server
started with `--http-read-timeout 2 --cors-allow-origins https://app.example`.
"""

import json
import os
import select
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

SERVE = ["--dtype", "float32", "--max-total-tokens", "8192", "--max-running-requests", "32", "--disable-compile"]
SHUTDOWN_ABORT = {"type": "abort", "message": "The server is shutting down."}
READ_TIMEOUT_S = 2
APP_ORIGIN = "https://app.example"
EVIL_ORIGIN = "https://evil.example"
LONG_STREAM = {"text": "Once upon a time", "stream": True, "sampling_params": {"max_new_tokens": 2000, "ignore_eos": True}}


# ---- helpers ----


def http(url: str, timeout: float = 60) -> httpx.Client:
    return httpx.Client(base_url=url, timeout=timeout, trust_env=False)


def parse_sse(body: bytes) -> list[Any]:
    """Checks SSE framing (`data: ...\\n\\n` events, `data: [DONE]` once and last); returns the JSON events."""
    assert body.endswith(b"data: [DONE]\n\n"), body[-300:]
    frames = body.split(b"\n\n")[:-1]
    assert all(f.startswith(b"data: ") for f in frames), frames[-3:]
    assert frames.count(b"data: [DONE]") == 1
    return [json.loads(f[len(b"data: ") :]) for f in frames[:-1]]


def stream_raw(url: str, body: dict[str, Any], started: threading.Event) -> tuple[int, bytes, float]:
    """POSTs a streamed /generate; sets `started` at the first event; returns status, the whole body and when it ended."""
    with http(url, timeout=120) as c, c.stream("POST", "/generate", json=body) as resp:
        raw = b""
        for part in resp.iter_bytes():
            raw += part
            if b"data: " in raw:
                started.set()
    return resp.status_code, raw, time.monotonic()


def post_timed(url: str, path: str, body: dict[str, Any], timeout: float = 120) -> tuple[httpx.Response, float]:
    with http(url, timeout=timeout) as c:
        resp = c.post(path, json=body)
    return resp, time.monotonic()


def wait_running(client: httpx.Client, count: int, timeout: float = 60.0, poll: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while True:
        info = client.get("/get_server_info").json()
        if info["num_running_reqs"] >= count:
            return
        assert time.monotonic() < deadline, f"{count} requests not running after {timeout}s: {info}"
        time.sleep(poll)


def processes() -> Iterator[tuple[int, int, int, str, str]]:
    """(pid, parent pid, process group, state, command line) of every process, from /proc (Linux)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue  # gone meanwhile
        state, ppid, pgrp = stat[stat.rindex(")") + 2 :].split()[:3]
        yield int(entry.name), int(ppid), int(pgrp), state, cmdline


def engine_child(server_pid: int) -> int:
    """The engine process's pid: the server's multiprocessing child (not its resource tracker)."""
    kids = [(pid, cmd) for pid, ppid, _, _, cmd in processes() if ppid == server_pid]
    engines = [pid for pid, cmd in kids if "spawn_main" in cmd]
    assert len(engines) == 1, kids
    return engines[0]


def live_group_members(pgid: int) -> list[tuple[int, str]]:
    return [(pid, cmd) for pid, _, pgrp, state, cmd in processes() if pgrp == pgid and state != "Z"]


def assert_group_gone(pgid: int, timeout: float = 5.0) -> None:
    """Nothing of the server's session (its engine process, the resource tracker) outlives it."""
    deadline = time.monotonic() + timeout
    while (left := live_group_members(pgid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, left


def refused_or_503(url: str, path: str = "/generate", body: dict[str, Any] | None = None) -> str:
    """A request on a new connection: "refused", or "503" (anything else fails; a hang is a timeout error)."""
    body = body or {"text": "Hello", "sampling_params": {"max_new_tokens": 2}}
    try:
        with http(url, timeout=10) as c:
            resp = c.post(path, json=body)
    except httpx.ConnectError:
        return "refused"
    except httpx.RemoteProtocolError:
        return "refused"  # accepted just before the listener closed, then dropped without an answer
    assert resp.status_code == 503, (resp.status_code, resp.text)
    assert set(resp.json()) == {"error"} and resp.json()["error"]["message"], resp.text
    return "503"


def while_polling_health(url: str, work: Callable[[], Any], every: float = 0.1) -> tuple[Any, list[float]]:
    """Runs `work` in a thread while GET /health is polled every `every` s; returns its result and each poll's latency."""
    latencies: list[float] = []
    with ThreadPoolExecutor(1) as pool, http(url, timeout=30) as c:
        fut = pool.submit(work)
        while not fut.done():
            t = time.monotonic()
            status = c.get("/health").status_code
            latencies.append(time.monotonic() - t)
            assert status == 200, status
            time.sleep(every)
        return fut.result(), latencies


# ---- 1. engine death ----


def test_engine_death_fails_requests_in_flight_and_exits_nonzero(launch_kiln_process):
    with launch_kiln_process(SERVE) as server, ThreadPoolExecutor(4) as pool, http(server.url) as c:
        proc, url = server.proc, server.url
        engine = engine_child(proc.pid)
        started = threading.Event()
        stream = pool.submit(stream_raw, url, LONG_STREAM, started)
        assert started.wait(60), server.log()
        plain = pool.submit(post_timed, url, "/generate", {**LONG_STREAM, "stream": False})
        wait_running(c, 2)

        os.kill(engine, signal.SIGKILL)
        killed = time.monotonic()
        during = pool.submit(refused_or_503, url)  # races the server noticing the death: 503 or refused, never 200

        resp, ended = plain.result(timeout=30)
        assert resp.status_code == 503, resp.text
        assert set(resp.json()) == {"error"} and "engine" in resp.json()["error"]["message"], resp.text
        assert ended - killed < 3.0, f"the request in flight took {ended - killed:.1f}s to fail"

        status, raw, ended = stream.result(timeout=30)
        assert status == 200
        events = parse_sse(raw)
        assert len(events) >= 2
        assert all(e["meta_info"]["finish_reason"] is None for e in events[:-1])
        assert set(events[-1]) == {"error"} and "engine" in events[-1]["error"]["message"], events[-1]
        assert ended - killed < 3.0, f"the stream took {ended - killed:.1f}s to end"

        assert during.result(timeout=15) in ("503", "refused")
        assert refused_or_503(url) in ("503", "refused")  # after the death was noticed

        try:
            code = proc.wait(timeout=10)
        except Exception:
            pytest.fail(f"the server did not exit within 10s of its engine's death; its log:\n{server.log()}")
        assert code == 1, server.log()  # non-zero, and not a signal: `kiln serve` returned 1
        assert "the engine process is gone" in server.log()
        assert_group_gone(proc.pid)


# ---- 2. SIGTERM: drain, then abort, then exit 0 ----

DRAIN_S = 6  # the short requests need well under this, even on a loaded 2-core box
SHORT_PROMPTS = ["The capital of France is", "1, 2, 3, 4,", "def fibonacci(n):", "Roses are red,"]
SHORT_PARAMS = {"temperature": 0, "max_new_tokens": 8}


def test_sigterm_drains_short_requests_aborts_long_ones_and_exits_zero(launch_kiln_process):
    with launch_kiln_process([*SERVE, "--graceful-shutdown-timeout", str(DRAIN_S)]) as server, ThreadPoolExecutor(8) as pool:
        proc, url = server.proc, server.url
        with http(url) as c:
            solo = [c.post("/generate", json={"text": p, "sampling_params": SHORT_PARAMS}).json() for p in SHORT_PROMPTS]
            started = threading.Event()
            long_params = {"temperature": 0, "max_new_tokens": 3000, "ignore_eos": True}
            long_body = {"text": "Tell me a long story.", "stream": True, "sampling_params": long_params}
            stream = pool.submit(stream_raw, url, long_body, started)
            assert started.wait(60), server.log()
            shorts = [pool.submit(post_timed, url, "/generate", {"text": p, "sampling_params": SHORT_PARAMS}) for p in SHORT_PROMPTS]
            wait_running(c, 5, poll=0.02)
        assert not any(f.done() for f in shorts), "a short request finished before SIGTERM: nothing left to drain"

        os.kill(proc.pid, signal.SIGTERM)
        termed = time.monotonic()

        # New connections: once the listener is closed (health stops answering 200) they are refused or get 503.
        deadline = time.monotonic() + 5
        while True:
            try:
                with http(url, timeout=5) as c:
                    if c.get("/health").status_code != 200:
                        break
            except httpx.TransportError:
                break
            assert time.monotonic() < deadline, "the server still answered /health 200 five seconds after SIGTERM"
            time.sleep(0.05)
        assert refused_or_503(url) in ("503", "refused")

        for fut, alone, prompt in zip(shorts, solo, SHORT_PROMPTS):
            resp, _ = fut.result(timeout=30)
            assert resp.status_code == 200, (prompt, resp.text)
            out = resp.json()
            assert out["meta_info"]["finish_reason"]["type"] in ("length", "stop"), out["meta_info"]
            assert out["text"] == alone["text"], (prompt, out["text"], alone["text"])
            assert out["output_ids"] == alone["output_ids"], prompt

        status, raw, ended = stream.result(timeout=30)
        assert status == 200
        events = parse_sse(raw)
        assert all(e["meta_info"]["finish_reason"] is None for e in events[:-1])
        assert events[-1]["meta_info"]["finish_reason"] == SHUTDOWN_ABORT, events[-1]
        assert len(events[-1]["output_ids"]) < 3000
        assert ended - termed > DRAIN_S - 1, f"the long stream was cut after {ended - termed:.1f}s, before the {DRAIN_S}s drain"

        try:
            code = proc.wait(timeout=max(1.0, termed + 15 + DRAIN_S - time.monotonic()))
        except Exception:
            pytest.fail(f"the server did not exit within {15 + DRAIN_S}s of SIGTERM; its log:\n{server.log()}")
        assert code == 0, server.log()
        log = server.log()
        assert "draining 5 requests" in log and "aborting 1 requests" in log, log
        assert_group_gone(proc.pid)


# ---- the shared server for 3-5 ----


@pytest.fixture(scope="module")
def shared(launch_kiln_process) -> Iterator[str]:
    args = [*SERVE, "--http-read-timeout", str(READ_TIMEOUT_S), "--cors-allow-origins", APP_ORIGIN]
    with launch_kiln_process(args) as server:
        yield server.url


def connect(url: str) -> socket.socket:
    parts = urlsplit(url)
    return socket.create_connection((parts.hostname, parts.port), timeout=10)


def wait_closed(socks: dict[socket.socket, float], timeout: float) -> dict[socket.socket, float]:
    """Waits until the server closes each socket (recv gives b"" or a reset); returns when, counted from each one's open time."""
    closed: dict[socket.socket, float] = {}
    deadline = time.monotonic() + timeout
    while len(closed) < len(socks) and time.monotonic() < deadline:
        ready, _, _ = select.select([s for s in socks if s not in closed], [], [], 0.2)
        for s in ready:
            try:
                data = s.recv(65536)
            except ConnectionResetError:
                data = b""
            assert data == b"", f"the server answered a stalled request: {data[:200]!r}"
            closed[s] = time.monotonic() - socks[s]
    return closed


# ---- 3. read timeouts ----


def test_stalled_clients_are_disconnected_and_others_are_served(shared):
    socks: dict[socket.socket, float] = {}
    stop_trickling = threading.Event()

    def others_served() -> None:
        """While the stalled connections wait for their timeout, everyone else is served."""
        with http(shared) as c:
            t = time.monotonic()
            assert c.get("/health").status_code == 200
            assert time.monotonic() - t < 1.0
            resp = c.post("/generate", json={"text": "Hello", "sampling_params": {"temperature": 0, "max_new_tokens": 3}})
            assert resp.status_code == 200, resp.text
            assert resp.json()["meta_info"]["finish_reason"]["type"] == "length"

    def trickle(s: socket.socket) -> None:
        """A head sent a byte every 0.5s: progress does not reset the head's deadline, so it is cut all the same."""
        for b in b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n":  # never completes
            if stop_trickling.wait(0.5):
                return
            try:
                s.sendall(bytes([b]))
            except OSError:
                return

    try:
        for _ in range(50):  # connect and send nothing
            s = connect(shared)
            socks[s] = time.monotonic()
        half_head = connect(shared)
        socks[half_head] = time.monotonic()
        half_head.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Ty")
        stalled_body = connect(shared)  # 8 of its 1000 bytes of body, then nothing
        socks[stalled_body] = time.monotonic()
        stalled_body.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n")
        stalled_body.sendall(b'{"text":')
        trickled = connect(shared)
        socks[trickled] = time.monotonic()
        with ThreadPoolExecutor(2) as pool:
            trickler = pool.submit(trickle, trickled)
            served = pool.submit(others_served)
            try:
                closed = wait_closed(socks, timeout=3 * READ_TIMEOUT_S + 2)
            finally:
                stop_trickling.set()
            served.result(timeout=60)
            trickler.result(timeout=10)
        assert len(closed) == len(socks), f"{len(socks) - len(closed)} of {len(socks)} stalled connections still open"
        assert max(closed.values()) < 3 * READ_TIMEOUT_S, sorted(closed.values())[-5:]
        assert min(closed.values()) > READ_TIMEOUT_S / 2, sorted(closed.values())[:5]  # not before the timeout
        with http(shared) as c:
            assert c.get("/health").status_code == 200
    finally:
        for s in socks:
            s.close()


def test_a_slow_but_steady_body_is_not_cut(shared):
    """The body deadline is per chunk: a body that takes twice the timeout, a chunk every quarter of it, is served."""
    body = json.dumps({"text": "Hello there", "sampling_params": {"temperature": 0, "max_new_tokens": 2}}).encode()
    with connect(shared) as s:
        head = b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\n"
        s.sendall(head + b"Content-Length: %d\r\n\r\n" % len(body))
        pieces = 8
        step = -(-len(body) // pieces)
        for i in range(0, len(body), step):
            time.sleep(READ_TIMEOUT_S / 4)
            s.sendall(body[i : i + step])
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
    assert b'"finish_reason":{"type":"length"' in answer, answer[-300:]


# ---- 4. big bodies ----


def test_huge_bodies_are_refused_without_blocking_the_server(shared):
    huge_generate = json.dumps({"text": "a" * (50 << 20)}).encode()
    huge_tokenize = json.dumps({"prompt": "a" * (50 << 20)}).encode()
    too_big = json.dumps({"text": "a" * (70 << 20)}).encode()

    def post_bytes(path: str, content: bytes) -> httpx.Response:
        with http(shared, timeout=120) as c:
            return c.post(path, content=content, headers={"content-type": "application/json"})

    for path, content, status, says in [
        ("/generate", huge_generate, 400, "characters"),
        ("/tokenize", huge_tokenize, 400, "characters"),
        ("/generate", too_big, 413, ""),
    ]:
        resp, latencies = while_polling_health(shared, lambda path=path, content=content: post_bytes(path, content))
        assert resp.status_code == status, (path, len(content), resp.status_code, resp.text[:300])
        body = resp.json()
        assert set(body) == {"error"} and says in body["error"]["message"], (path, body)
        assert latencies, "no /health poll overlapped the huge request"
        assert max(latencies) < 1.0, (path, latencies)
    assert "52428800 characters" in post_bytes("/generate", huge_generate).json()["error"]["message"]


# ---- 5. origins ----


def test_foreign_origins_cannot_change_state(shared):
    with http(shared) as c, ThreadPoolExecutor(2) as pool:
        bystander_body = {"text": "The weather today is", "sampling_params": {"temperature": 0, "max_new_tokens": 16, "ignore_eos": True}}
        bystander: Future = pool.submit(post_timed, shared, "/generate", bystander_body)
        wait_running(c, 1)
        # A page on another origin can send this "simple" request without a preflight: it must not abort anything.
        resp = c.post("/abort_request", content=b'{"abort_all": true}', headers={"Origin": EVIL_ORIGIN, "content-type": "text/plain"})
        assert resp.status_code == 403, resp.text
        assert set(resp.json()) == {"error"} and EVIL_ORIGIN in resp.json()["error"]["message"]
        resp = c.post("/generate", json=bystander_body, headers={"Origin": EVIL_ORIGIN})
        assert resp.status_code == 403 and set(resp.json()) == {"error"}, resp.text
        resp = c.put("/generate", json=bystander_body, headers={"Origin": EVIL_ORIGIN})
        assert resp.status_code == 403 and set(resp.json()) == {"error"}, resp.text
        done, _ = bystander.result(timeout=120)
        assert done.status_code == 200, done.text
        assert done.json()["meta_info"]["finish_reason"] == {"type": "length", "length": 16}

        # The same abort without Origin (curl, scripts) works, and really aborts.
        long_params = {"max_new_tokens": 2000, "ignore_eos": True}
        victim: Future = pool.submit(post_timed, shared, "/generate", {**bystander_body, "sampling_params": long_params})
        wait_running(c, 1)
        resp = c.post("/abort_request", content=b'{"abort_all": true}', headers={"content-type": "text/plain"})
        assert resp.status_code == 200, resp.text
        gone, _ = victim.result(timeout=60)
        assert gone.status_code == 200, gone.text
        assert gone.json()["meta_info"]["finish_reason"]["type"] == "abort"

        # Reads are fine from anywhere.
        assert c.get("/health", headers={"Origin": EVIL_ORIGIN}).status_code == 200
        assert c.get("/get_model_info", headers={"Origin": EVIL_ORIGIN}).status_code == 200


def test_allowed_origin_may_post_and_gets_cors_headers(shared):
    with http(shared) as c:
        resp = c.post("/generate", json={"text": "Hi", "sampling_params": {"max_new_tokens": 2}}, headers={"Origin": APP_ORIGIN})
        assert resp.status_code == 200, resp.text
        assert resp.headers.get("access-control-allow-origin") == APP_ORIGIN
        pre = c.options("/generate", headers={"Origin": APP_ORIGIN, "Access-Control-Request-Method": "POST"})
        assert pre.status_code in (200, 204), pre.text
        assert pre.headers.get("access-control-allow-origin") == APP_ORIGIN
        assert "POST" in pre.headers.get("access-control-allow-methods", "")
        evil = c.options("/generate", headers={"Origin": EVIL_ORIGIN, "Access-Control-Request-Method": "POST"})
        assert "access-control-allow-origin" not in evil.headers, dict(evil.headers)
