"""Streaming /generate, client disconnects, /abort_request, and /flush_cache while busy."""

import contextlib
import json
import threading
import time
from collections.abc import Iterator

import httpx

LONG = {"temperature": 0, "max_new_tokens": 2000, "ignore_eos": True}


def parse_sse(body: bytes) -> list[dict]:
    """Checks SSE framing (`data: ...\\n\\n` events, `data: [DONE]` last); returns the JSON events."""
    assert body.endswith(b"data: [DONE]\n\n"), body[-200:]
    frames = body.split(b"\n\n")
    assert frames[-1] == b""
    frames = frames[:-1]
    assert all(f.startswith(b"data: ") for f in frames), frames
    assert frames.count(b"data: [DONE]") == 1
    return [json.loads(f[len(b"data: ") :]) for f in frames[:-1]]


def stream_events(client: httpx.Client, body: dict) -> tuple[httpx.Response, list[dict]]:
    with client.stream("POST", "/generate", json={**body, "stream": True}) as resp:
        raw = resp.read()
    return resp, parse_sse(raw)


def check_cumulative(events: list[dict]) -> None:
    assert len(events) >= 2
    for prev, cur in zip(events, events[1:]):
        assert cur["text"].startswith(prev["text"])
        assert cur["output_ids"][: len(prev["output_ids"])] == prev["output_ids"]
        assert len(cur["output_ids"]) > len(prev["output_ids"])
        assert prev["meta_info"]["finish_reason"] is None
    assert events[-1]["meta_info"]["finish_reason"] is not None
    for e in events:
        assert e["meta_info"]["completion_tokens"] == len(e["output_ids"])


@contextlib.contextmanager
def running_stream(client: httpx.Client, rid: str, events: int = 2) -> Iterator[tuple[httpx.Response, Iterator[str]]]:
    """A long greedy streaming request; yields once `events` events have arrived."""
    body = {"text": "Tell me a long story about a dragon.", "rid": rid, "stream": True, "sampling_params": LONG}
    with client.stream("POST", "/generate", json=body) as resp:
        assert resp.status_code == 200, resp.read()
        lines = (line for line in resp.iter_lines() if line)
        for _ in range(events):
            line = next(lines)
            assert line.startswith("data: {"), line
            assert json.loads(line[6:])["meta_info"]["finish_reason"] is None
        yield resp, lines


def test_stream_status_and_content_type(client):
    resp, events = stream_events(client, {"text": "The sky is", "sampling_params": {"temperature": 0, "max_new_tokens": 3}})
    assert len(events) >= 1
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/event-stream"), resp.headers["content-type"]


def test_stream_cumulative_and_equal_to_non_stream(client, generate):
    body = {"text": "Once upon a time", "rid": "stream-1", "sampling_params": {"temperature": 0, "max_new_tokens": 10, "ignore_eos": True}}
    _, events = stream_events(client, body)
    check_cumulative(events)
    final = events[-1]
    assert final["meta_info"]["finish_reason"] == {"type": "length", "length": 10}
    assert {e["meta_info"]["id"] for e in events} == {"stream-1"}
    plain = generate({**body, "rid": "stream-1-plain"})
    assert final["text"] == plain["text"]
    assert final["output_ids"] == plain["output_ids"]
    assert len(events) > 2  # really incremental, not one final event


def test_stream_stop_string(client, generate):
    params = {"temperature": 0, "max_new_tokens": 16, "stop": " of"}
    _, events = stream_events(client, {"text": "The sky is", "sampling_params": params})
    plain = generate({"text": "The sky is", "sampling_params": params})
    assert plain["meta_info"]["finish_reason"] == {"type": "stop", "matched": " of"}
    final = events[-1]
    assert final["meta_info"]["finish_reason"] == plain["meta_info"]["finish_reason"]
    assert final["text"] == plain["text"]
    assert final["output_ids"] == plain["output_ids"]
    for e in events:
        assert final["text"].startswith(e["text"])  # the stop string never shows up, even briefly


def test_stream_batch_has_index(client, generate):
    prompts = ["The sky is", "Once upon a time"]
    params = {"temperature": 0, "max_new_tokens": 4, "ignore_eos": True}
    _, events = stream_events(client, {"text": prompts, "sampling_params": params})
    plain = generate({"text": prompts, "sampling_params": params})
    for i in range(2):
        mine = [e for e in events if e["index"] == i]
        check_cumulative(mine)
        assert mine[-1]["text"] == plain[i]["text"]
        assert mine[-1]["output_ids"] == plain[i]["output_ids"]
    assert {e["index"] for e in events} == {0, 1}


def test_stream_max_new_tokens_zero(client):
    _, events = stream_events(client, {"text": "The sky is", "sampling_params": {"max_new_tokens": 0}})
    assert len(events) == 1
    assert events[0]["text"] == "" and events[0]["output_ids"] == []
    assert events[0]["meta_info"]["finish_reason"] == {"type": "length", "length": 0}


def test_stream_disconnect_frees_slots(client, wait_idle):
    before = wait_idle()
    with running_stream(client, "disconnect-me") as (resp, _):
        info = client.get("/get_server_info").json()
        assert info["num_running_reqs"] == 1
        assert info["free_slots"] < before["free_slots"]
        resp.close()  # the client goes away mid-stream
    after = wait_idle(timeout=30, available_slots=before["available_slots"])  # the request is gone, its slots all free
    assert after["num_running_reqs"] == 0


def test_non_stream_disconnect_frees_slots(kiln_server, client, wait_idle):
    before = wait_idle()
    body = {"text": "Tell me a long story about a dragon.", "rid": "gone-away", "sampling_params": LONG}
    outcome: list[BaseException] = []

    def impatient_client() -> None:
        try:
            httpx.post(f"{kiln_server}/generate", json=body, timeout=httpx.Timeout(30, read=5.0), trust_env=False)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            outcome.append(exc)

    thread = threading.Thread(target=impatient_client)
    thread.start()
    seen_running = False
    deadline = time.monotonic() + 4.5
    while time.monotonic() < deadline and not seen_running:
        info = client.get("/get_server_info").json()
        seen_running = info["num_running_reqs"] == 1 and info["free_slots"] < before["free_slots"]
        time.sleep(0.1)
    thread.join(timeout=60)
    assert seen_running, "the request never showed up as running"
    assert len(outcome) == 1 and isinstance(outcome[0], httpx.ReadTimeout), outcome  # it gave up and hung up
    wait_idle(timeout=30, available_slots=before["available_slots"])


def test_abort_request_by_rid(client, wait_idle):
    before = wait_idle()
    start = time.monotonic()
    with running_stream(client, "abort-me") as (_, lines):
        resp = client.post("/abort_request", json={"rid": "abort-me"})
        assert resp.status_code == 200
        rest = list(lines)
    assert rest[-1] == "data: [DONE]"
    last = json.loads(rest[-2].removeprefix("data: "))
    reason = last["meta_info"]["finish_reason"]
    assert reason["type"] == "abort", reason
    assert "message" in reason
    assert last["meta_info"]["id"] == "abort-me"
    assert last["meta_info"]["completion_tokens"] < 2000
    assert time.monotonic() - start < 120
    wait_idle(available_slots=before["available_slots"])


def test_flush_cache_refused_while_running(client, wait_idle):
    before = wait_idle()
    with running_stream(client, "busy-flush") as (_, lines):
        resp = client.post("/flush_cache")
        assert resp.status_code == 400
        assert resp.text.startswith("Cache flushed.")
        client.post("/abort_request", json={"rid": "busy-flush"})
        list(lines)
    wait_idle(available_slots=before["available_slots"])
    assert client.post("/flush_cache").status_code == 200


def test_abort_request_by_rid_ends_its_n_copies(client, wait_idle):
    before = wait_idle()
    body = {"text": "Count", "rid": "parent", "stream": True, "sampling_params": {"max_new_tokens": 2000, "ignore_eos": True, "n": 2}}
    with client.stream("POST", "/generate", json=body) as resp:
        lines = resp.iter_lines()
        assert next(line for line in lines if line.startswith("data: {"))
        assert client.post("/abort_request", json={"rid": "parent"}).status_code == 200
        chunks = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    finished = {c["meta_info"]["id"]: c["meta_info"]["finish_reason"] for c in chunks if c["meta_info"]["finish_reason"]}
    assert set(finished) == {"parent-0", "parent-1"}
    assert all(reason["type"] == "abort" for reason in finished.values())
    wait_idle(available_slots=before["available_slots"])
