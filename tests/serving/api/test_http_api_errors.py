"""Bad input: a 400 with {"error": {"message": ...}} naming the problem, and the server keeps serving."""

import pytest

P = pytest.param


def sp(**params):
    """A one-prompt /generate body with these sampling params."""
    return {"text": "Hello", "sampling_params": params}


# (body, substrings the message must contain); the value of a broken rule is named too.
GENERATE_CASES = [
    # which input
    P({}, ["text", "input_ids"], id="missing-input"),
    P({"sampling_params": {"max_new_tokens": 1}}, ["text", "input_ids"], id="only-sampling-params"),
    P({"text": "Hello", "input_ids": [1, 2]}, ["text", "input_ids"], id="both-text-and-input-ids"),
    P({"text": []}, ["text", "empty"], id="empty-text-list"),
    P({"text": ""}, ["empty"], id="empty-text"),
    P({"input_ids": []}, ["input_ids", "empty"], id="empty-input-ids"),
    P({"input_ids": [[1, 2], []]}, ["empty"], id="empty-input-ids-in-batch"),
    # types
    P({"text": 5}, ["text"], id="text-int"),
    P({"text": ["Hello", 7]}, ["text"], id="text-list-with-int"),
    P({"input_ids": ["a", "b"]}, ["input_ids"], id="input-ids-strings"),
    P({"input_ids": [1.5, 2]}, ["input_ids"], id="input-ids-float"),
    P({"input_ids": [[1, 2], 3]}, ["input_ids"], id="input-ids-mixed-nesting"),
    P({"text": "Hello", "sampling_params": "x"}, ["sampling_params"], id="sampling-params-str"),
    P(sp(temperature="hot"), ["temperature"], id="temperature-str"),
    P(sp(max_new_tokens="ten"), ["max_new_tokens"], id="max-new-tokens-str"),
    P(sp(foo=1), ["foo"], id="unknown-sampling-param"),
    P({"text": "Hello", "rid": 5}, ["rid"], id="rid-int"),
    P({"text": "Hello", "stream": "yes"}, ["stream"], id="stream-str"),
    # sampling rules
    P(sp(temperature=-1), ["temperature", "-1"], id="temperature-negative"),
    P(sp(top_p=0), ["top_p", "0"], id="top-p-zero"),
    P(sp(top_p=1.5), ["top_p", "1.5"], id="top-p-above-one"),
    P(sp(top_k=0), ["top_k", "0"], id="top-k-zero"),
    P(sp(top_k=-5), ["top_k", "-5"], id="top-k-negative"),
    P(sp(min_p=2), ["min_p", "2"], id="min-p-above-one"),
    P(sp(min_p=-0.5), ["min_p", "-0.5"], id="min-p-negative"),
    P(sp(max_new_tokens=-1), ["max_new_tokens", "-1"], id="max-new-tokens-negative"),
    P(sp(min_new_tokens=5, max_new_tokens=2), ["min_new_tokens", "5"], id="min-above-max-new-tokens"),
    P(sp(min_new_tokens=-1), ["min_new_tokens", "-1"], id="min-new-tokens-negative"),
    P(sp(repetition_penalty=3), ["repetition_penalty", "3"], id="repetition-penalty-3"),
    P(sp(repetition_penalty=-0.5), ["repetition_penalty", "-0.5"], id="repetition-penalty-negative"),
    P(sp(frequency_penalty=3), ["frequency_penalty", "3"], id="frequency-penalty-3"),
    P(sp(presence_penalty=-3), ["presence_penalty", "-3"], id="presence-penalty-minus-3"),
    P(sp(n=0), ["n", "0"], id="n-zero"),
    P(sp(regex="a+", json_schema="{}"), ["regex", "json_schema"], id="two-constraints"),
    P(sp(logit_bias={"999999": 1.0}), ["logit_bias", "999999"], id="logit-bias-outside-vocab"),
    # token ids and lengths
    P({"input_ids": [1, 49152]}, ["49152"], id="token-id-at-vocab-size"),
    P({"input_ids": [1, -1]}, ["-1"], id="token-id-negative"),
    P({"input_ids": [[1, 2], [3, 10**9]]}, [str(10**9)], id="token-id-outside-vocab-in-batch"),
    P({"input_ids": [1] * 9000}, ["9000", "8192", "context"], id="prompt-longer-than-context"),
    P({"input_ids": [[1, 2], [1] * 9000]}, ["9000", "8192"], id="one-prompt-of-batch-too-long"),
    P({"input_ids": [1] * 100, "sampling_params": {"max_new_tokens": 8100}}, ["8200", "8192"], id="prompt-plus-output-over-pool"),
    # batch lists
    P({"text": ["a", "b"], "sampling_params": [{}]}, ["sampling_params"], id="sampling-params-list-too-short"),
    P({"text": "a", "sampling_params": [{}, {}]}, ["sampling_params"], id="sampling-params-list-for-one-input"),
    P({"text": ["a", "b"], "sampling_params": [{}, {"temperature": -1}]}, ["temperature"], id="bad-params-in-list"),
    P({"text": ["a", "b"], "rid": ["x"]}, ["rid"], id="rid-list-too-short"),
    P({"text": ["a", "b"], "rid": ["x", "x"]}, ["Duplicate request IDs", "x"], id="rid-list-duplicates"),
    # a stream request that is invalid is answered 400 before any event
    P({"text": 5, "stream": True}, ["text"], id="stream-text-int"),
    P({"text": "Hello", "stream": True, "sampling_params": {"top_p": 0}}, ["top_p"], id="stream-top-p-zero"),
]


def check_error(resp, must_contain: list[str]) -> str:
    assert resp.status_code == 400, (resp.status_code, resp.text)
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    assert set(body) == {"error"}, body
    message = body["error"]["message"]
    assert isinstance(message, str) and message
    for word in must_contain:
        assert word in message, f"{word!r} not in {message!r}"
    return message


@pytest.fixture
def still_serves(generate):
    """After the test: the server still answers a real /generate."""
    yield
    res = generate({"input_ids": [1, 2, 3], "sampling_params": {"temperature": 0, "max_new_tokens": 1, "ignore_eos": True}})
    assert res["meta_info"]["finish_reason"] == {"type": "length", "length": 1}


@pytest.mark.parametrize(("body", "must_contain"), GENERATE_CASES)
def test_generate_bad_input(client, still_serves, body, must_contain):
    check_error(client.post("/generate", json=body), must_contain)


@pytest.mark.parametrize(
    ("raw", "must_contain"),
    [
        P(b'{"text": ', ["JSON"], id="truncated"),
        P(b'{"text": "Hello",}', ["JSON"], id="trailing-comma"),
        P(b"not json at all", ["JSON"], id="not-json"),
        P(b"[1, 2, 3]", [], id="json-array"),
        P(b"", ["empty"], id="empty-body"),
    ],
)
def test_generate_malformed_body(client, still_serves, raw, must_contain):
    check_error(client.post("/generate", content=raw, headers={"content-type": "application/json"}), must_contain)


def test_generate_put_bad_input(client, still_serves):
    check_error(client.put("/generate", json={"text": "Hello", "sampling_params": {"top_k": 0}}), ["top_k"])


@pytest.mark.parametrize(
    ("path", "body", "must_contain"),
    [
        P("/tokenize", {"prompt": 5}, ["prompt"], id="tokenize-prompt-int"),
        P("/tokenize", {}, ["prompt"], id="tokenize-missing-prompt"),
        P("/detokenize", {"tokens": [49152]}, ["49152"], id="detokenize-outside-vocab"),
        P("/detokenize", {"tokens": ["a"]}, ["tokens"], id="detokenize-strings"),
        P("/detokenize", {}, ["tokens"], id="detokenize-missing-tokens"),
        P("/abort_request", {}, ["rid"], id="abort-without-rid"),
    ],
)
def test_other_endpoints_bad_input(client, still_serves, path, body, must_contain):
    check_error(client.post(path, json=body), must_contain)


def test_abort_request_malformed_json(client, still_serves):
    resp = client.post("/abort_request", content=b"{bad", headers={"content-type": "application/json"})
    check_error(resp, ["JSON"])


def test_valid_request_after_errors(generate, solo_greedy):
    ref = solo_greedy("The sky is", 16)
    res = generate({"text": "The sky is", "sampling_params": {"temperature": 0, "max_new_tokens": 16, "ignore_eos": True}})
    assert res["output_ids"] == ref["output_ids"]
