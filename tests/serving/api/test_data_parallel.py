"""`--dp-size 2`: two engines behind one server, requests routed by cached prefix, else by load.

One module server (SmolLM2, float32, eager) serves every test; the last one kills an engine and so ends it.
The single-engine reference is the session server of tests/serving/conftest.py (`solo_greedy`).
"""

import os
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

SERVE = [
    "--dtype", "float32", "--max-total-tokens", "4096", "--max-running-requests", "32", "--disable-compile",
    "--dp-size", "2", "--enable-metrics",
]  # fmt: skip
# Shorter than one routing block (16 tokens): these go to the least loaded engine.
SHORT_PROMPTS = ["The capital of France is", "Once upon a time", "In 1492,", "A haiku about rain:"]
GREEDY_TOKENS = 8
LONG = {"max_new_tokens": 2000, "ignore_eos": True, "temperature": 0}


def long_prefix(tag: str) -> str:
    """About 80 tokens no other test sends, so nothing of it is cached anywhere at first."""
    return " ".join(f"{tag}{i}" for i in range(30)) + ". Now answer:"


@pytest.fixture(scope="module")
def server(launch_kiln_process: Any) -> Iterator[Any]:
    with launch_kiln_process(SERVE) as proc:
        yield proc


@pytest.fixture(scope="module")
def dp(server: Any) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=120, trust_env=False) as c:
        yield c


def gen(c: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    resp = c.post("/generate", json=body)
    assert resp.status_code == 200, resp.text
    return resp.json()


def running(c: httpx.Client) -> list[int]:
    load = c.get("/get_load").json()
    assert [e["dp_rank"] for e in load] == [0, 1], load
    return [e["num_running_reqs"] for e in load]


def wait_running(c: httpx.Client, want: list[int], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while (now := running(c)) != want:
        assert time.monotonic() < deadline, f"running per engine {now}, expected {want}"
        time.sleep(0.05)


def cached_in_tree(c: httpx.Client) -> list[int]:
    return [s["cached_tokens_in_tree"] for s in c.get("/get_server_info").json()["internal_states"]]


def engine_pids(server_pid: int) -> list[int]:
    """The server's multiprocessing children (not its resource tracker), from /proc (Linux)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
            cmd = (entry / "cmdline").read_bytes()
        except OSError:
            continue  # not a process, or gone meanwhile
        if int(stat[stat.rindex(")") + 2 :].split()[1]) == server_pid and b"spawn_main" in cmd:
            pids.append(int(entry.name))
    return pids


def flush(c: httpx.Client) -> None:
    resp = c.post("/flush_cache")
    assert resp.status_code == 200, resp.text
    assert cached_in_tree(c) == [0, 0]


def test_each_engine_is_shown(dp):
    load = dp.get("/get_load").json()
    assert [set(e) for e in load] == [{"dp_rank", "num_running_reqs", "num_waiting_reqs", "num_tokens"}] * 2
    assert [e["dp_rank"] for e in load] == [0, 1]
    info = dp.get("/get_server_info").json()
    assert info["dp_size"] == 2
    assert [s["dp_rank"] for s in info["internal_states"]] == [0, 1]
    assert [s["max_total_num_tokens"] for s in info["internal_states"]] == [4096, 4096]
    assert info["max_total_num_tokens"] == 4096  # engine 0's, at the top level
    metrics = dp.get("/metrics").text
    for rank in (0, 1):
        assert any(line.startswith("sglang:num_running_reqs{") and f'dp_rank="{rank}"' in line for line in metrics.splitlines()), metrics


def test_32_concurrent_requests_match_a_single_engine(dp, solo_greedy):
    flush(dp)
    prompts = SHORT_PROMPTS * 8
    params = {"temperature": 0, "max_new_tokens": GREEDY_TOKENS, "ignore_eos": True}
    with ThreadPoolExecutor(len(prompts)) as pool:
        results = list(pool.map(lambda p: gen(dp, {"text": p, "sampling_params": params}), prompts))
    for prompt, res in zip(prompts, results):
        ref = solo_greedy(prompt, GREEDY_TOKENS)
        assert res["output_ids"] == ref["output_ids"], prompt
        assert res["text"] == ref["text"]
    # both engines served some (each one's radix cache now holds what it computed)
    assert all(n > 0 for n in cached_in_tree(dp)), cached_in_tree(dp)


def test_repeated_prefix_goes_back_to_its_engine(dp):
    """The prefix's first request lands on engine 1 (engine 0 is busy); with both idle again, load alone
    would pick engine 0, so a cache hit on the second request shows the prefix routed it."""
    prefix = long_prefix("route")
    with ThreadPoolExecutor(1) as pool:
        blocker = pool.submit(gen, dp, {"text": "Tell me a story.", "sampling_params": LONG, "rid": "dp-blocker"})
        wait_running(dp, [1, 0])
        first = gen(dp, {"text": prefix + " yes", "sampling_params": {"max_new_tokens": 2}})
        assert first["meta_info"]["cached_tokens"] == 0
        assert dp.post("/abort_request", json={"rid": "dp-blocker"}).status_code == 200
        aborted = blocker.result(timeout=30)
    assert aborted["meta_info"]["finish_reason"]["type"] == "abort"
    assert aborted["meta_info"]["completion_tokens"] < LONG["max_new_tokens"]
    wait_running(dp, [0, 0])
    second = gen(dp, {"text": prefix + " no", "sampling_params": {"max_new_tokens": 2}})
    assert second["meta_info"]["cached_tokens"] >= first["meta_info"]["prompt_tokens"] - 4, (first["meta_info"], second["meta_info"])


def test_flush_cache_reaches_both_engines(dp):
    a, b = long_prefix("flushA"), long_prefix("flushB")
    # one batch: the first prompt goes to engine 0, the second (no shared block) to the less loaded engine 1
    gen(dp, {"text": [a, b], "sampling_params": {"max_new_tokens": 2}})
    assert all(n > 0 for n in cached_in_tree(dp))
    flush(dp)
    again = gen(dp, {"text": a, "sampling_params": {"max_new_tokens": 2}})
    assert again["meta_info"]["cached_tokens"] == 0


def test_abort_all_reaches_both_engines(dp):
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(gen, dp, {"text": "Tell me a story.", "sampling_params": LONG})
        wait_running(dp, [1, 0])
        second = pool.submit(gen, dp, {"text": "Tell me a story.", "sampling_params": LONG})
        wait_running(dp, [1, 1])
        assert dp.post("/abort_request", json={"abort_all": True}).status_code == 200
        for res in (first.result(timeout=30), second.result(timeout=30)):
            assert res["meta_info"]["finish_reason"]["type"] == "abort"
            assert res["meta_info"]["completion_tokens"] < LONG["max_new_tokens"]


def test_one_engine_dying_ends_every_request_and_the_server(server, dp):
    """Last: it ends the module server. The request on the surviving engine ends with the same 503."""
    engines = engine_pids(server.proc.pid)
    assert len(engines) == 2, engines
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(dp.post, "/generate", json={"text": "Tell me a story.", "sampling_params": LONG})
        wait_running(dp, [1, 0])
        second = pool.submit(dp.post, "/generate", json={"text": "Tell me a story.", "sampling_params": LONG})
        wait_running(dp, [1, 1])
        os.kill(engines[0], signal.SIGKILL)
        for resp in (first.result(timeout=30), second.result(timeout=30)):
            assert resp.status_code == 503, resp.text
            assert "engine" in resp.json()["error"]["message"], resp.text
    assert server.proc.wait(timeout=30) == 1, server.log()
