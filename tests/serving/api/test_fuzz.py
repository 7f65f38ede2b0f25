"""Fuzzing the request schemas: whatever a body holds, the answer is a 2xx or a 4xx in SGLang's error shape,
never a 5xx, and a bystander request running all along keeps getting its own greedy text.

Bodies are drawn from the same msgspec structs the server decodes (msgspec.inspect walks them), with
hostile values mixed in: 64-bit overflows, negative and zero counts, ids outside the vocabulary, broken
grammars, and raw bodies that are not what the schema says (deep nesting, wrong types, bad JSON).
"""

import json
import threading
import uuid
from typing import Any

import httpx
import msgspec
import msgspec.inspect as mi
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kiln.serving.api.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeReqInput,
    EncodeReqInput,
    GenerateReqInput,
    ResponsesRequest,
    ScoreRequest,
    TokenizeReqInput,
)
from kiln.serving.sampling_params import SamplingParams

HOSTILE_INTS = [-1, 0, 1, 49151, 49152, 2**31, 2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**30]
HOSTILE_FLOATS = [0.0, 1.0, -1.0, 2.5, 1e-9, 1e308, -1e308]
HOSTILE_STRS = ["", "Hello", "$$ANY$$", "[a-", "root ::= ", '{"type": "object"}', "\x00", "é" * 40]
ROUTES = {
    "/generate": GenerateReqInput,
    "/v1/completions": CompletionRequest,
    "/v1/chat/completions": ChatCompletionRequest,
    "/v1/responses": ResponsesRequest,
    "/tokenize": TokenizeReqInput,
    "/detokenize": DetokenizeReqInput,
    "/v1/score": ScoreRequest,
    "/encode": EncodeReqInput,
}
BYSTANDER = {"text": "The capital of France is", "sampling_params": {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True}}


def of_type(t: mi.Type) -> st.SearchStrategy[Any]:
    """Values of a msgspec type, valid ones and hostile ones alike (small counts keep each request cheap)."""
    if isinstance(t, mi.IntType):
        return st.integers(-2, 12) | st.sampled_from(HOSTILE_INTS)
    if isinstance(t, mi.FloatType):
        return st.floats(-3, 3, allow_nan=False) | st.sampled_from(HOSTILE_FLOATS)
    if isinstance(t, mi.BoolType):
        return st.booleans()
    if isinstance(t, mi.StrType):
        return st.text(max_size=24) | st.sampled_from(HOSTILE_STRS)
    if isinstance(t, mi.NoneType):
        return st.none()
    if isinstance(t, mi.ListType):
        return st.lists(of_type(t.item_type), max_size=4)
    if isinstance(t, mi.DictType):
        return st.dictionaries(of_type(t.key_type), of_type(t.value_type), max_size=3)
    if isinstance(t, mi.UnionType):
        return st.one_of([of_type(x) for x in t.types])
    if isinstance(t, mi.StructType):
        required = {f.encode_name: of_type(f.type) for f in t.fields if f.required}
        optional = {f.encode_name: of_type(f.type) for f in t.fields if not f.required}
        return st.fixed_dictionaries(required, optional=optional)
    if isinstance(t, mi.LiteralType):
        return st.sampled_from(t.values)
    if isinstance(t, mi.RawType):  # free-form JSON: a response_format's schema
        return st.sampled_from([{"type": "object"}, {"type": "string", "maxLength": 3}, {"type": "nonsense"}, {"$ref": "#/nowhere"}, [], 7])
    raise TypeError(f"no strategy for {t}")


def deeply_nested(depth: int) -> bytes:
    return b'{"input_ids": ' + b"[" * depth + b"1" + b"]" * depth + b', "text": ["x"], "tokens": ' + b"[" * depth + b"]" * depth + b"}"


RAW_BODIES = st.sampled_from(
    [b"", b"{", b"[]", b"null", b"1", b'"text"', b'{"text": "hi"', deeply_nested(3), deeply_nested(1200), deeply_nested(100_000)]
)


# A valid body per route, onto which up to two fields (and, for /generate, two sampling parameters) are drawn.
BASES: dict[str, dict[str, Any]] = {
    "/generate": {"text": "Hello", "sampling_params": {"max_new_tokens": 4, "temperature": 0}},
    "/v1/completions": {"prompt": "Hello", "max_tokens": 4},
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
    "/v1/responses": {"input": "Hi", "max_output_tokens": 4},
    "/tokenize": {"prompt": "Hello"},
    "/detokenize": {"tokens": [1, 2, 3]},
    "/v1/score": {"query": "Is it", "items": [" yes", " no"], "label_token_ids": [1, 2]},
    "/encode": {"text": "hi"},
}


def overlay(schema: type) -> st.SearchStrategy[dict[str, Any]]:
    fields = {f.encode_name: of_type(f.type) for f in mi.type_info(schema).fields}
    names = st.lists(st.sampled_from(sorted(fields)), max_size=2, unique=True)
    return names.flatmap(lambda chosen: st.fixed_dictionaries({n: fields[n] for n in chosen}))


def near_valid(path: str) -> st.SearchStrategy[dict[str, Any]]:
    base = BASES[path]
    bodies = overlay(ROUTES[path]).map(lambda over: {**base, **over})
    if path != "/generate":
        return bodies
    return st.tuples(bodies, overlay(SamplingParams)).map(
        lambda pair: {**pair[0], "sampling_params": {**base["sampling_params"], **pair[1]}} if pair[0].get("sampling_params") == base["sampling_params"] else pair[0]
    )


def body_for(path: str) -> st.SearchStrategy[bytes]:
    typed = of_type(mi.type_info(ROUTES[path])).map(msgspec.json.encode)
    valid_ish = near_valid(path).map(msgspec.json.encode)
    return st.one_of(valid_ish, valid_ish, typed, RAW_BODIES)


def bounded(path: str, body: bytes) -> bytes:
    """Valid OpenAI bodies without a token limit would generate up to the whole context: each gets 4 tokens."""
    if path not in ("/v1/completions", "/v1/chat/completions", "/v1/responses") or not body.startswith(b"{"):
        return body
    try:
        obj = json.loads(body)
    except (ValueError, RecursionError):
        return body
    limit = "max_output_tokens" if path == "/v1/responses" else "max_tokens"
    if isinstance(obj, dict) and obj.get(limit) is None and obj.get("max_completion_tokens") is None:
        obj[limit] = 4
    return msgspec.json.encode(obj)


def check_answer(path: str, resp: httpx.Response) -> None:
    assert resp.status_code < 500, f"{path} -> {resp.status_code}: {resp.text[:500]}"
    if resp.status_code >= 400:
        body = resp.json()
        if path.startswith("/v1/"):
            assert body["object"] == "error" and isinstance(body["message"], str) and body["code"] == resp.status_code, body
        else:
            assert isinstance(body["error"]["message"], str), body


class Bystander:
    """Sends the same greedy request over and over while the fuzzing runs; every answer must be the expected one."""

    def __init__(self, base_url: str, expected: str):
        self.expected = expected
        self.answers = 0
        self.wrong: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(base_url,), daemon=True)

    def _run(self, base_url: str) -> None:
        with httpx.Client(base_url=base_url, timeout=120, trust_env=False) as client:
            while not self._stop.is_set():
                resp = client.post("/generate", json={**BYSTANDER, "rid": f"bystander-{uuid.uuid4().hex}"})
                got = resp.json()["text"] if resp.status_code == 200 else f"HTTP {resp.status_code}: {resp.text}"
                self.answers += 1
                if got != self.expected:
                    self.wrong.append(got)

    def __enter__(self) -> "Bystander":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=120)


@pytest.fixture(scope="module")
def bystander(kiln_server: str, generate) -> Bystander:
    expected = generate(BYSTANDER)["text"]
    with Bystander(kiln_server, expected) as b:
        yield b
    assert b.answers > 0
    assert not b.wrong, f"{len(b.wrong)} of {b.answers} bystander answers changed: {b.wrong[:3]}"


COUNTS: dict[str, int] = {}


@pytest.mark.parametrize("path", list(ROUTES))
def test_fuzzed_bodies_never_get_a_5xx(path: str, client: httpx.Client, bystander: Bystander):
    @settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(body=body_for(path), stream=st.booleans())
    def run(body: bytes, stream: bool) -> None:
        body = bounded(path, body)
        if stream and body.startswith(b"{") and path in ("/generate", "/v1/completions", "/v1/chat/completions", "/v1/responses"):
            try:
                body = msgspec.json.encode({**json.loads(body), "stream": True})
            except (ValueError, TypeError, RecursionError):
                pass  # not a JSON object the test can edit: sent as it is
        resp = client.post(path, content=body, headers={"content-type": "application/json"})
        check_answer(path, resp)
        if resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream"):
            assert resp.text.rstrip().endswith("data: [DONE]"), resp.text[-300:]
        COUNTS[f"{path} {resp.status_code}"] = COUNTS.get(f"{path} {resp.status_code}", 0) + 1

    run()
    answered = sum(v for k, v in COUNTS.items() if k.startswith(path + " "))
    assert answered >= 40
    print(f"fuzz {path}: " + ", ".join(f"{k.split()[1]}: {v}" for k, v in sorted(COUNTS.items()) if k.startswith(path + " ")))
