"""Sampling parameters that change logits or randomness: penalties, logit_bias, min_new_tokens, seeds."""

import json

import pytest

PROMPT = "The sky is"
P = pytest.param


@pytest.mark.parametrize(
    "extra",
    [
        P({"min_new_tokens": 2}, id="min_new_tokens"),
        P({"repetition_penalty": 1.3}, id="repetition_penalty"),
        P({"frequency_penalty": 0.5}, id="frequency_penalty"),
        P({"presence_penalty": 0.5}, id="presence_penalty"),
        P({"logit_bias": {"28": -5.0}}, id="logit_bias"),
    ],
)
def test_valid_penalties_run_and_free_their_slots(generate, wait_idle, extra):
    before = wait_idle()
    params = {"temperature": 0, "max_new_tokens": 4, "ignore_eos": True, **extra}
    res = generate({"text": PROMPT, "sampling_params": params})
    assert res["meta_info"]["finish_reason"] == {"type": "length", "length": 4}, res["meta_info"]["finish_reason"]
    assert len(res["output_ids"]) == 4
    wait_idle(timeout=10, available_slots=before["available_slots"])


def test_request_gives_back_its_slots_whatever_its_outcome(generate, wait_idle):
    """Finished, stopped or aborted by an engine error: the KV slots of the request all come back."""
    before = wait_idle()
    params = {"temperature": 0, "max_new_tokens": 4, "ignore_eos": True, "repetition_penalty": 1.1}
    generate({"text": "What is the capital of France?", "sampling_params": params})
    wait_idle(timeout=10, available_slots=before["available_slots"])


def test_logit_bias_forces_a_token(generate, tokenize):
    forced = tokenize(" banana")
    assert len(forced) == 1, forced
    params = {"temperature": 0, "max_new_tokens": 5, "ignore_eos": True, "logit_bias": {str(forced[0]): 100.0}}
    res = generate({"text": PROMPT, "sampling_params": params})
    assert res["output_ids"] == forced * 5
    assert res["text"] == " banana" * 5


def test_min_new_tokens_bans_eos(generate, tokenize):
    eos_id = tokenize("<|im_end|>")[0]
    prompt = "What is the capital of France?"  # greedy answers <|im_end|> at once
    plain = generate({"text": prompt, "sampling_params": {"temperature": 0, "max_new_tokens": 6}})
    assert plain["output_ids"] == [eos_id]
    params = {"temperature": 0, "max_new_tokens": 6, "min_new_tokens": 3}
    res = generate({"text": prompt, "sampling_params": params})
    reason = res["meta_info"]["finish_reason"]
    assert reason in ({"type": "length", "length": 6}, {"type": "stop", "matched": eos_id}), reason
    assert res["meta_info"]["completion_tokens"] >= 3
    assert eos_id not in res["output_ids"][:3]


def test_penalized_request_does_not_disturb_a_greedy_one(client, generate, wait_idle):
    """A request with penalties, run while another request decodes, leaves that one alone."""
    before = wait_idle()
    body = {
        "text": "Tell me a long story about a dragon.",
        "rid": "bystander",
        "stream": True,
        "sampling_params": {"temperature": 0, "max_new_tokens": 2000, "ignore_eos": True},
    }
    with client.stream("POST", "/generate", json=body) as resp:
        lines = (line for line in resp.iter_lines() if line)
        first = json.loads(next(lines).removeprefix("data: "))
        assert first["meta_info"]["finish_reason"] is None
        penalized = generate({"text": PROMPT, "sampling_params": {"temperature": 0, "max_new_tokens": 3, "repetition_penalty": 1.2}})
        # read a few more events of the bystander, then stop it
        events = []
        for line in lines:
            if line == "data: [DONE]" or len(events) == 3:
                break
            events.append(json.loads(line.removeprefix("data: ")))
        client.post("/abort_request", json={"rid": "bystander"})
        list(lines)
    reasons = [e["meta_info"]["finish_reason"] for e in events]
    assert reasons == [None, None, None], reasons  # still decoding after the penalized request
    assert penalized["meta_info"]["finish_reason"]["type"] in ("length", "stop"), penalized["meta_info"]
    wait_idle(available_slots=before["available_slots"])


def test_sampling_seed_reproducible(generate):
    params = {"temperature": 1.0, "max_new_tokens": 8, "ignore_eos": True, "sampling_seed": 1234}
    a = generate({"text": "Once upon a time", "sampling_params": params})
    b = generate({"text": "Once upon a time", "sampling_params": params})
    assert a["output_ids"] == b["output_ids"]
    assert len(a["output_ids"]) == 8


def test_parallel_sampling_shares_the_prefill_and_is_reproducible(generate):
    body = {
        "text": "Write one word that describes the ocean:",
        "sampling_params": {"n": 4, "temperature": 1.0, "max_new_tokens": 8, "sampling_seed": 1234, "ignore_eos": True},
    }
    first, again = generate(body), generate(body)
    assert len(first) == 4
    assert [r["output_ids"] for r in first] == [r["output_ids"] for r in again]
    assert len({tuple(r["output_ids"]) for r in first}) > 1, "the n samples must differ"
    prompt = first[0]["meta_info"]["prompt_tokens"]
    # Copies after the first reuse its prompt's KV from the radix cache, all but the two tokens always computed.
    assert all(r["meta_info"]["cached_tokens"] >= prompt - 2 for r in first[1:])


def test_stop_regex_finishes_on_the_matched_text(generate, solo_greedy):
    free = solo_greedy("The capital of France is", 8)
    assert free["text"].startswith(" Paris.")
    body = {"text": "The capital of France is", "sampling_params": {"temperature": 0, "max_new_tokens": 8, "stop_regex": [r"\d+", r"P\w+"]}}
    out = generate(body)
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": "Paris"}
    assert out["text"] == " " and out["output_ids"] == free["output_ids"][: len(out["output_ids"])]
    kept = generate({**body, "sampling_params": {**body["sampling_params"], "no_stop_trim": True}})
    assert kept["text"] == " Paris"


@pytest.mark.parametrize("pattern, needle", [("(", "Invalid stop_regex"), ("a*", "must not match the empty string")])
def test_a_broken_stop_regex_is_a_400(client, pattern, needle):
    r = client.post("/generate", json={"text": "hi", "sampling_params": {"stop_regex": pattern}})
    assert r.status_code == 400 and needle in r.json()["error"]["message"], r.text
