"""Fixtures for the HTTP tests: one real `kiln serve` on loopback for the whole session.

The server runs the default model (SmolLM2-135M-Instruct) in float32 on a
8192-token KV pool with at most 32 running requests; the tests talk to it over
plain HTTP with httpx.
"""

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 120.0
REQUEST_TIMEOUT_S = 120.0
MAX_TOTAL_TOKENS = 8192
MAX_RUNNING_REQUESTS = 32


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _log_text(path: Path, limit: int = 20000) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"<no server log: {exc}>"
    return text[-limit:]


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL; the server runs in its own session, so its engine child goes too."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the group: also an engine process left behind
    except ProcessLookupError:
        pass
    if proc.poll() is None:
        proc.wait(timeout=10)


@pytest.fixture(scope="session")
def server_port() -> int:
    return _free_port()


@dataclass
class KilnProcess:
    """A running `kiln serve`: its base URL, its process (the session leader), and its log."""

    url: str
    proc: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return _log_text(self.log_path)


@contextmanager
def serve_kiln(port: int, extra_args: list[str], log_dir: Path) -> Iterator[str]:
    """Runs `kiln serve` on 127.0.0.1:port with extra_args, waits for GET /health == 200, yields the base URL."""
    with serve_kiln_process(port, extra_args, log_dir) as server:
        yield server.url


@contextmanager
def serve_kiln_process(port: int, extra_args: list[str], log_dir: Path) -> Iterator[KilnProcess]:
    """serve_kiln, for tests that signal or watch the process: yields a KilnProcess; stops whatever is left of it on exit."""
    exe = Path(sys.executable).with_name("kiln")
    if not exe.exists():
        pytest.fail(f"the kiln executable is not next to the interpreter: {exe} is missing")
    cmd = [str(exe), "serve", "--host", "127.0.0.1", "--port", str(port), *extra_args]
    log_path = log_dir / "server.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # Idle OpenMP workers sleep instead of spinning: on a small CI box shared with
    # other processes, spinning workers made each decode step 10x slower or worse.
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=env, start_new_session=True,
        )  # fmt: skip
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"kiln serve exited with code {proc.returncode} during start-up; its log:\n{_log_text(log_path)}")
            try:
                if httpx.get(f"{base_url}/health", timeout=2, trust_env=False).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"kiln serve did not answer GET /health with 200 in {START_TIMEOUT_S:.0f}s; its log:\n{_log_text(log_path)}")
            time.sleep(0.5)
        yield KilnProcess(base_url, proc, log_path)
    finally:
        _stop(proc)


@pytest.fixture(scope="session")
def kiln_server(server_port: int, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The default model in float32, eager, on a small KV pool."""
    args = [
        "--dtype", "float32",
        "--max-total-tokens", str(MAX_TOTAL_TOKENS),
        "--max-running-requests", str(MAX_RUNNING_REQUESTS),
        "--disable-compile",
    ]  # fmt: skip
    with serve_kiln(server_port, args, tmp_path_factory.mktemp("kiln_server")) as url:
        yield url


@pytest.fixture(scope="session")
def launch_kiln(tmp_path_factory: pytest.TempPathFactory) -> Callable[[list[str]], Any]:
    """For tests that need another model: `with launch_kiln(args) as url:` serves it on a free port."""
    return lambda args: serve_kiln(_free_port(), args, tmp_path_factory.mktemp("kiln_server"))


@pytest.fixture(scope="session")
def launch_kiln_process(tmp_path_factory: pytest.TempPathFactory) -> Callable[[list[str]], Any]:
    """Like launch_kiln, but `with launch_kiln_process(args) as server:` yields a KilnProcess (url, proc, log_path)."""
    return lambda args: serve_kiln_process(_free_port(), args, tmp_path_factory.mktemp("kiln_server"))


@pytest.fixture(scope="session")
def client(kiln_server: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=kiln_server, timeout=REQUEST_TIMEOUT_S, trust_env=False) as c:
        yield c


@pytest.fixture(scope="session")
def generate(client: httpx.Client) -> Callable[..., Any]:
    """POSTs a /generate body, asserts 200, returns the decoded JSON."""

    def _generate(body: dict[str, Any]) -> Any:
        resp = client.post("/generate", json=body)
        assert resp.status_code == 200, f"/generate {body!r} -> {resp.status_code}: {resp.text}"
        return resp.json()

    return _generate


@pytest.fixture(scope="session")
def solo_greedy(generate: Callable[..., Any]) -> Callable[[str, int], dict[str, Any]]:
    """The greedy result of one prompt sent alone (nothing else in flight), cached per session.

    ignore_eos keeps every output at exactly max_new_tokens tokens.
    """
    cache: dict[tuple[str, int], dict[str, Any]] = {}

    def _solo(prompt: str, max_new_tokens: int) -> dict[str, Any]:
        key = (prompt, max_new_tokens)
        if key not in cache:
            params = {"temperature": 0, "max_new_tokens": max_new_tokens, "ignore_eos": True}
            cache[key] = generate({"text": prompt, "sampling_params": params})
        return cache[key]

    return _solo


@pytest.fixture(scope="session")
def tokenize(client: httpx.Client) -> Callable[[str], list[int]]:
    def _tokenize(text: str) -> list[int]:
        resp = client.post("/tokenize", json={"prompt": text, "add_special_tokens": False})
        assert resp.status_code == 200, resp.text
        return resp.json()["tokens"]

    return _tokenize


@pytest.fixture(scope="session")
def detokenize(client: httpx.Client) -> Callable[[list[int]], str]:
    def _detokenize(ids: list[int]) -> str:
        resp = client.post("/detokenize", json={"tokens": ids})
        assert resp.status_code == 200, resp.text
        return resp.json()["text"]

    return _detokenize


@pytest.fixture(scope="session")
def wait_idle(client: httpx.Client) -> Callable[..., dict[str, Any]]:
    """Polls /get_server_info until nothing runs or waits, and (if given) `available_slots` KV slots are free or held only by the radix cache.

    Returns the last server info. Tests pass the free-slot count they saw before
    their requests, so each checks that its own requests gave every slot back.
    """

    def _wait(timeout: float = 30.0, available_slots: int | None = None) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            info = client.get("/get_server_info").json()
            idle = info["num_running_reqs"] == 0 and info.get("num_waiting_reqs", 0) == 0
            if idle and (available_slots is None or info["available_slots"] == available_slots):
                return info
            if time.monotonic() > deadline:
                want = "" if available_slots is None else f" with {available_slots} slots free or evictable"
                raise AssertionError(f"server not idle{want} after {timeout}s: {info}")
            time.sleep(0.2)

    return _wait



@dataclass
class KeyedServer:
    """A running server with both keys set; `client` sends the API key, `admin` the admin key."""

    url: str
    api_key: str
    admin_key: str
    client: httpx.Client
    admin: httpx.Client
    process: KilnProcess


@pytest.fixture(scope="session")
def keyed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KeyedServer]:
    """The default model (float32, eager) with --api-key, --admin-api-key and --enable-metrics: the
    production routes' tests (weights, metrics, keys) share it, one at a time."""
    api_key, admin_key = "api-key-for-tests", "admin-key-for-tests"
    args = [
        "--dtype", "float32", "--max-total-tokens", "4096", "--max-running-requests", "8", "--disable-compile",
        "--enable-metrics", "--api-key", api_key, "--admin-api-key", admin_key,
    ]  # fmt: skip
    with serve_kiln_process(_free_port(), args, tmp_path_factory.mktemp("keyed_server")) as server:
        client = lambda key: httpx.Client(  # noqa: E731
            base_url=server.url, timeout=REQUEST_TIMEOUT_S, trust_env=False, headers={"Authorization": f"Bearer {key}"}
        )
        with client(api_key) as c, client(admin_key) as a:
            yield KeyedServer(server.url, api_key, admin_key, c, a, server)
