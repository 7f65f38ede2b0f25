"""Output logprobs over HTTP, against transformers' log_softmax of the same steps (float32, SmolLM2)."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

PROMPT = "The three primary colours are"
WANTED = [13, 314, 2]


@pytest.fixture(scope="module")
def reference(client, tokenize):
    folder = client.get("/get_server_info").json()["checkpoint"]
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

    def logprobs(prompt_ids: list[int], output_ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            logits = hf(torch.tensor([prompt_ids + output_ids])).logits[0]
        return torch.log_softmax(logits[len(prompt_ids) - 1 : -1], dim=-1)  # the step that chose each output

    return logprobs


def test_output_logprobs_match_transformers(client, tokenize, reference):
    body = {
        "text": PROMPT,
        "sampling_params": {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True},
        "return_logprob": True,
        "top_logprobs_num": 3,
        "token_ids_logprob": WANTED,
        "return_text_in_logprobs": True,
    }
    r = client.post("/generate", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    meta = out["meta_info"]
    want = reference(tokenize(PROMPT), out["output_ids"])
    assert [t for _, t, _ in meta["output_token_logprobs"]] == out["output_ids"]
    got = torch.tensor([v for v, _, _ in meta["output_token_logprobs"]])
    torch.testing.assert_close(got, want[torch.arange(8), torch.tensor(out["output_ids"])], atol=1e-4, rtol=0)
    for step, top in enumerate(meta["output_top_logprobs"]):
        values, ids = want[step].topk(3)
        assert [t for _, t, _ in top] == ids.tolist()
        torch.testing.assert_close(torch.tensor([v for v, _, _ in top]), values, atol=1e-4, rtol=0)
        assert all(isinstance(text, str) for _, _, text in top)
    for step, picked in enumerate(meta["output_token_ids_logprobs"]):
        assert [t for _, t, _ in picked] == WANTED
        torch.testing.assert_close(torch.tensor([v for v, _, _ in picked]), want[step, WANTED], atol=1e-4, rtol=0)
    assert meta["input_token_logprobs"] == [] and meta["input_top_logprobs"] == []


@pytest.mark.parametrize("start", [0, 3])
def test_input_logprobs_match_transformers(client, tokenize, start):
    prompt = "Paris is the capital of France, and Berlin is the capital of"
    ids = tokenize(prompt)
    body = {"input_ids": ids, "sampling_params": {"max_new_tokens": 0}, "return_logprob": True, "logprob_start_len": start, "top_logprobs_num": 2}
    # Twice: the second run finds the prompt in the radix cache, and must still compute what it scores.
    for _ in range(2):
        r = client.post("/generate", json=body)
        assert r.status_code == 200, r.text
        meta = r.json()["meta_info"]
        got = meta["input_token_logprobs"]
        assert [t for _, t, _ in got] == ids[start:]
        if start == 0:
            assert got[0][0] is None
            got = got[1:]
        with torch.no_grad():
            want = torch.log_softmax(hf_logits(client, ids), dim=-1)
        rows = torch.arange(max(start, 1) - 1, len(ids) - 1)
        torch.testing.assert_close(torch.tensor([v for v, _, _ in got]), want[rows, torch.tensor(ids)[rows + 1]], atol=1e-4, rtol=0)
        tops = meta["input_top_logprobs"][1:] if start == 0 else meta["input_top_logprobs"]
        assert [[t for _, t, _ in top] for top in tops] == want[rows].topk(2).indices.tolist()


_HF = {}


def hf_logits(client, ids: list[int]) -> torch.Tensor:
    if "model" not in _HF:
        folder = client.get("/get_server_info").json()["checkpoint"]
        _HF["model"] = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return _HF["model"](torch.tensor([ids])).logits[0]


def test_streamed_logprobs_equal_the_final_ones(client):
    body = {"text": PROMPT, "sampling_params": {"temperature": 0, "max_new_tokens": 6}, "return_logprob": True}
    whole = client.post("/generate", json=body).json()["meta_info"]["output_token_logprobs"]
    with client.stream("POST", "/generate", json={**body, "stream": True}) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    last = events[-1]["meta_info"]["output_token_logprobs"]
    assert [t for _, t, _ in last] == [t for _, t, _ in whole]
    torch.testing.assert_close(torch.tensor([v for v, _, _ in last]), torch.tensor([v for v, _, _ in whole]))
    assert all(text is None for _, _, text in last), "text only with return_text_in_logprobs"


@pytest.mark.parametrize(
    "extra,needle",
    [
        ({"logprob_start_len": -2}, "logprob_start_len"),
        ({"top_logprobs_num": -1}, "top_logprobs_num"),
        ({"token_ids_logprob": [10**7]}, "token_ids_logprob"),
    ],
)
def test_bad_logprob_options_are_400(client, extra, needle):
    r = client.post("/generate", json={"text": "hi", "return_logprob": True, **extra})
    assert r.status_code == 400 and needle in r.json()["error"]["message"]
