"""/generate over real HTTP against a `kiln serve` subprocess (see conftest.py).

Shapes follow SGLang's native API (shared/sglang-native-apis.md and
shared/reference/api-notes.md). Streaming and aborts are in
test_http_api_stream.py, the info/tokenizer endpoints in test_http_api_info.py,
bad input in test_http_api_errors.py, penalties and seeds in
test_http_api_sampling.py.
"""

import asyncio
import time

import httpx

# Keys of meta_info in SGLang's reference /generate response.
META_KEYS = {
    "id", "finish_reason", "prompt_tokens", "weight_version", "total_retractions", "completion_tokens",
    "cached_tokens", "cached_tokens_details", "e2e_latency", "response_sent_to_client_ts",
}  # fmt: skip

# 32 different prompts of different lengths (ragged prefill in one batch).
PROMPTS = [
    "The sky is",
    "Once upon a time",
    "The capital of France is Paris, and the capital of Italy is",
    "def fibonacci(n):",
    "My favourite fruit is",
    "In 1492, Columbus",
    "The quick brown fox",
    "Water boils at",
    "To make a cup of tea, first",
    "The three primary colours are",
    "Dear Sir or Madam,",
    "import numpy as np\n",
    "The moon orbits",
    "Photosynthesis is the process by which plants",
    "A haiku about autumn:",
    "The best way to learn a language is",
    "Once there was a little robot who",
    "The stock market today",
    "SELECT * FROM users WHERE",
    "Roses are red, violets are blue,",
    "The first law of thermodynamics states that",
    "My grandmother always told me",
    "The train left the station at",
    "Here is a list of things to pack for a trip:",
    "The mitochondria is",
    "In a small village by the sea",
    "Machine learning models are trained by",
    "The recipe calls for two cups of",
    "Breaking news:",
    "The old lighthouse keeper",
    "1, 2, 3, 4,",
    "Winter is coming, and the",
]
assert len(set(PROMPTS)) == 32

GREEDY_TOKENS = 16


def greedy(max_new_tokens: int = GREEDY_TOKENS, **extra) -> dict:
    return {"temperature": 0, "max_new_tokens": max_new_tokens, "ignore_eos": True, **extra}


def check_response(res: dict, prompt_tokens: int | None = None) -> None:
    assert set(res) == {"text", "output_ids", "meta_info"}
    meta = res["meta_info"]
    assert set(meta) == META_KEYS
    assert isinstance(res["text"], str)
    assert all(type(t) is int for t in res["output_ids"])
    assert meta["completion_tokens"] == len(res["output_ids"])
    assert isinstance(meta["id"], str) and meta["id"]
    assert meta["weight_version"] == "default"
    assert isinstance(meta["e2e_latency"], float) and meta["e2e_latency"] > 0
    assert abs(meta["response_sent_to_client_ts"] - time.time()) < 300
    assert isinstance(meta["cached_tokens"], int) and 0 <= meta["cached_tokens"] <= meta["prompt_tokens"]
    if prompt_tokens is not None:
        assert meta["prompt_tokens"] == prompt_tokens


# ---- inputs and shapes ----


def test_generate_text(generate, tokenize, detokenize):
    prompt = "Once upon a time"
    res = generate({"text": prompt, "sampling_params": greedy(8)})
    check_response(res, prompt_tokens=len(tokenize(prompt)))
    assert res["meta_info"]["finish_reason"] == {"type": "length", "length": 8}
    assert len(res["output_ids"]) == 8
    assert res["text"] == detokenize(res["output_ids"])
    assert res["text"].strip()


def test_generate_default_params_shape(generate):
    # As in the reference: only `text`; defaults are sampling at temperature 1 for up to 128 tokens.
    res = generate({"text": "What is the capital of France?"})
    check_response(res)
    reason = res["meta_info"]["finish_reason"]
    n = res["meta_info"]["completion_tokens"]
    if reason["type"] == "length":
        assert reason == {"type": "length", "length": 128} and n == 128  # the default max_new_tokens
    else:
        assert reason["type"] == "stop" and 1 <= n <= 128


def test_generate_text_list_in_input_order(generate, tokenize, solo_greedy):
    prompts = [PROMPTS[2], PROMPTS[0], PROMPTS[13]]  # different lengths
    res = generate({"text": prompts, "sampling_params": greedy()})
    assert isinstance(res, list) and len(res) == len(prompts)
    ids = [r["meta_info"]["id"] for r in res]
    assert len(set(ids)) == len(prompts)
    for prompt, r in zip(prompts, res):
        check_response(r, prompt_tokens=len(tokenize(prompt)))
        assert r["output_ids"] == solo_greedy(prompt, GREEDY_TOKENS)["output_ids"]


def test_generate_input_ids_matches_text(generate, tokenize, solo_greedy):
    prompt = PROMPTS[1]
    ids = tokenize(prompt)
    res = generate({"input_ids": ids, "sampling_params": greedy()})
    check_response(res, prompt_tokens=len(ids))
    ref = solo_greedy(prompt, GREEDY_TOKENS)
    assert res["output_ids"] == ref["output_ids"]
    assert res["text"] == ref["text"]


def test_generate_input_ids_list(generate, tokenize, solo_greedy):
    prompts = [PROMPTS[3], PROMPTS[4]]
    batch = [tokenize(p) for p in prompts]
    res = generate({"input_ids": batch, "sampling_params": greedy()})
    assert isinstance(res, list) and len(res) == 2
    for prompt, ids, r in zip(prompts, batch, res):
        check_response(r, prompt_tokens=len(ids))
        assert r["output_ids"] == solo_greedy(prompt, GREEDY_TOKENS)["output_ids"]


def test_generate_single_input_ids_list_of_one_is_a_batch(generate, tokenize):
    ids = tokenize("The sky is")
    res = generate({"input_ids": [ids], "sampling_params": greedy(2)})
    assert isinstance(res, list) and len(res) == 1
    check_response(res[0], prompt_tokens=len(ids))


def test_rid_honored(generate):
    res = generate({"text": "The sky is", "rid": "my-request-1", "sampling_params": greedy(2)})
    assert res["meta_info"]["id"] == "my-request-1"
    rids = ["rid-b", "rid-a", "rid-c"]
    res = generate({"text": ["one", "two", "three"], "rid": rids, "sampling_params": greedy(2)})
    assert [r["meta_info"]["id"] for r in res] == rids


def test_per_input_sampling_params(generate):
    res = generate({"text": ["The sky is", "The sky is"], "sampling_params": [greedy(2), greedy(5)]})
    assert [r["meta_info"]["finish_reason"] for r in res] == [
        {"type": "length", "length": 2},
        {"type": "length", "length": 5},
    ]
    assert res[1]["output_ids"][:2] == res[0]["output_ids"]


# ---- finish reasons ----


def test_finish_length(generate):
    res = generate({"text": "The sky is", "sampling_params": greedy(7)})
    assert res["meta_info"]["finish_reason"] == {"type": "length", "length": 7}
    assert res["meta_info"]["completion_tokens"] == 7


def test_max_new_tokens_zero(generate, tokenize):
    res = generate({"text": "The sky is", "sampling_params": {"temperature": 0, "max_new_tokens": 0}})
    check_response(res, prompt_tokens=len(tokenize("The sky is")))
    assert res["text"] == ""
    assert res["output_ids"] == []
    assert res["meta_info"]["finish_reason"] == {"type": "length", "length": 0}
    assert res["meta_info"]["completion_tokens"] == 0


def test_stop_string_trimmed_and_kept_with_no_stop_trim(generate, solo_greedy, detokenize):
    ref = solo_greedy("The sky is", GREEDY_TOKENS)
    stop = detokenize(ref["output_ids"][2:3])  # the third token's text
    assert stop.strip(), f"want a visible stop string, got {stop!r}"
    cut = ref["text"].index(stop)
    params = {"temperature": 0, "max_new_tokens": GREEDY_TOKENS, "stop": stop}

    res = generate({"text": "The sky is", "sampling_params": params})
    assert res["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    assert res["text"] == ref["text"][:cut]
    n = len(res["output_ids"])
    assert 1 <= n < GREEDY_TOKENS
    assert res["output_ids"] == ref["output_ids"][:n]
    assert stop in detokenize(res["output_ids"])

    kept = generate({"text": "The sky is", "sampling_params": {**params, "no_stop_trim": True}})
    assert kept["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    assert kept["output_ids"] == res["output_ids"]
    assert kept["text"] == detokenize(kept["output_ids"])
    assert kept["text"].startswith(ref["text"][:cut] + stop)


def test_stop_string_across_tokens(generate, solo_greedy, detokenize):
    ref = solo_greedy("Once upon a time", GREEDY_TOKENS)
    stop = detokenize(ref["output_ids"][2:4])  # spans two tokens
    cut = ref["text"].index(stop)
    params = {"temperature": 0, "max_new_tokens": GREEDY_TOKENS, "stop": stop}
    res = generate({"text": "Once upon a time", "sampling_params": params})
    assert res["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    assert res["text"] == ref["text"][:cut]
    assert res["output_ids"] == ref["output_ids"][: len(res["output_ids"])]


def test_stop_string_list_first_match_wins(generate, solo_greedy, detokenize):
    ref = solo_greedy("Once upon a time", GREEDY_TOKENS)
    early, late = detokenize(ref["output_ids"][1:2]), detokenize(ref["output_ids"][5:6])
    assert early.strip() and late.strip() and early not in detokenize(ref["output_ids"][:1])
    assert late not in detokenize(ref["output_ids"][:2])
    params = {"temperature": 0, "max_new_tokens": GREEDY_TOKENS, "stop": ["never-appears-xyz", late, early]}
    res = generate({"text": "Once upon a time", "sampling_params": params})
    assert res["meta_info"]["finish_reason"] == {"type": "stop", "matched": early}
    assert res["output_ids"] == ref["output_ids"][:2]
    assert res["text"] == ref["text"][: ref["text"].index(early)]


def test_stop_token_ids(generate, solo_greedy, detokenize):
    ref = solo_greedy("The sky is", GREEDY_TOKENS)
    stop_id = ref["output_ids"][3]
    n = ref["output_ids"].index(stop_id) + 1
    params = {"temperature": 0, "max_new_tokens": GREEDY_TOKENS, "stop_token_ids": [stop_id]}

    res = generate({"text": "The sky is", "sampling_params": params})
    assert res["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop_id}
    assert res["output_ids"] == ref["output_ids"][:n]  # the stop token is in output_ids ...
    assert res["text"] == detokenize(ref["output_ids"][: n - 1])  # ... but its text is trimmed

    kept = generate({"text": "The sky is", "sampling_params": {**params, "no_stop_trim": True}})
    assert kept["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop_id}
    assert kept["output_ids"] == ref["output_ids"][:n]
    assert kept["text"] == detokenize(ref["output_ids"][:n])
    assert len(kept["text"]) > len(res["text"])


def test_eos_stops_and_ignore_eos_goes_on(generate, tokenize, client):
    eos = tokenize("<|im_end|>")
    assert len(eos) == 1, eos
    eos_id = eos[0]
    # Without a chat template this instruct model answers a bare question with <|im_end|> first.
    prompt = "What is the capital of France?"
    res = generate({"text": prompt, "sampling_params": {"temperature": 0, "max_new_tokens": 8}})
    assert res["meta_info"]["finish_reason"] == {"type": "stop", "matched": eos_id}
    assert res["output_ids"][-1] == eos_id
    assert "<|im_end|>" not in res["text"]

    more = generate({"text": prompt, "sampling_params": {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True}})
    assert more["meta_info"]["finish_reason"] == {"type": "length", "length": 8}
    assert more["output_ids"][: len(res["output_ids"])] == res["output_ids"]
    assert len(more["output_ids"]) == 8


def test_eos_text_with_special_tokens(generate):
    prompt = "What is the capital of France?"
    base = {"temperature": 0, "max_new_tokens": 3, "skip_special_tokens": False}
    stopped = generate({"text": prompt, "sampling_params": base})
    assert stopped["meta_info"]["finish_reason"]["type"] == "stop"
    assert "<|im_end|>" not in stopped["text"]  # the matched stop token is trimmed ...
    kept = generate({"text": prompt, "sampling_params": {**base, "no_stop_trim": True}})
    assert kept["text"].endswith("<|im_end|>")  # ... unless no_stop_trim
    past = generate({"text": prompt, "sampling_params": {**base, "ignore_eos": True}})
    assert past["text"].startswith("<|im_end|>")


# ---- greedy determinism under batching ----


def test_greedy_batch_equals_solo(generate, solo_greedy):
    prompts = PROMPTS[:6]
    res = generate({"text": prompts, "sampling_params": greedy()})
    for prompt, r in zip(prompts, res):
        ref = solo_greedy(prompt, GREEDY_TOKENS)
        assert r["output_ids"] == ref["output_ids"], prompt
        assert r["text"] == ref["text"], prompt


def test_greedy_repeatable(generate, solo_greedy):
    ref = solo_greedy(PROMPTS[6], GREEDY_TOKENS)
    again = generate({"text": PROMPTS[6], "sampling_params": greedy()})
    assert again["output_ids"] == ref["output_ids"]


def test_32_concurrent_requests_match_solo(kiln_server, solo_greedy, wait_idle):
    refs = [solo_greedy(p, GREEDY_TOKENS) for p in PROMPTS]  # each alone first
    before = wait_idle()

    async def send_all() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=kiln_server, timeout=300, limits=httpx.Limits(max_connections=64), trust_env=False) as ac:
            bodies = [{"text": p, "rid": f"conc-{i}", "sampling_params": greedy()} for i, p in enumerate(PROMPTS)]
            return await asyncio.gather(*(ac.post("/generate", json=b) for b in bodies))

    responses = asyncio.run(send_all())
    assert [r.status_code for r in responses] == [200] * 32
    for i, (prompt, resp, ref) in enumerate(zip(PROMPTS, responses, refs)):
        r = resp.json()
        assert r["meta_info"]["id"] == f"conc-{i}"
        assert r["meta_info"]["finish_reason"] == {"type": "length", "length": GREEDY_TOKENS}
        assert r["output_ids"] == ref["output_ids"], prompt
        assert r["text"] == ref["text"], prompt
    wait_idle(available_slots=before["available_slots"])
