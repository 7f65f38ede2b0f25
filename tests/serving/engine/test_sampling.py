"""Sampling parameters' rules, the sampler's filters and penalties, and seeded reproducibility."""

import pytest
import torch

from kiln.serving.engine.request import Req
from kiln.serving.engine.sampler import apply_penalties, edits_logits, sample
from kiln.serving.sampling_params import SamplingParams, SamplingParamsError


@pytest.mark.parametrize(
    "field,value,needle",
    [
        ("temperature", -0.5, "temperature"),
        ("top_p", 0.0, "top_p"),
        ("top_p", 1.5, "top_p"),
        ("top_k", 0, "top_k"),
        ("min_p", 1.5, "min_p"),
        ("max_new_tokens", -1, "max_new_tokens"),
        ("frequency_penalty", 2.5, "frequency_penalty"),
        ("presence_penalty", -3.0, "presence_penalty"),
        ("repetition_penalty", 2.5, "repetition_penalty"),
        ("n", 0, "n must"),
        ("logit_bias", {"abc": 1.0}, "logit_bias"),
    ],
)
def test_broken_rules_name_the_field(field, value, needle):
    with pytest.raises(SamplingParamsError, match=needle) as info:
        SamplingParams(**{field: value}).validate(vocab_size=1000)
    assert str(value) in str(info.value) or field == "logit_bias"


def test_min_new_tokens_above_max_and_two_grammars_are_rejected():
    with pytest.raises(SamplingParamsError, match="min_new_tokens"):
        SamplingParams(max_new_tokens=4, min_new_tokens=5).validate(1000)
    with pytest.raises(SamplingParamsError, match="Only one of"):
        SamplingParams(regex="a+", ebnf="root ::= 'a'").validate(1000)


def make(seed: int = 0, **params) -> Req:
    return Req("r", [1, 2, 3], SamplingParams(**params), seed)


def test_greedy_and_top_k_1_take_the_argmax():
    logits = torch.randn(3, 50)
    reqs = [make(temperature=0), make(top_k=1, temperature=2.0), make(temperature=0.0, top_p=0.5)]
    assert sample(logits.clone(), reqs) == logits.argmax(-1).tolist()


def test_seeded_sampling_is_reproducible_and_batch_independent():
    logits = torch.randn(4, 100)
    alone = [sample(logits[i : i + 1].clone(), [make(seed=7, sampling_seed=123 + i)]) for i in range(4)]
    batched = sample(logits.clone(), [make(seed=99, sampling_seed=123 + i) for i in range(4)])
    assert [a[0] for a in alone] == batched


def test_filters_keep_only_allowed_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(200, 1)
    for params, allowed in [
        (dict(top_k=2), {0, 1}),
        (dict(top_p=0.6), {0, 1}),  # 0.5 alone is below 0.6, so the second token is needed
        (dict(min_p=0.5), {0, 1}),  # 0.3 >= 0.5 * 0.5 stays; 0.15 does not
        (dict(top_p=0.4), {0}),
    ]:
        reqs = [make(seed=s, **params) for s in range(200)]
        assert set(sample(logits.clone(), reqs)) == allowed, params


def test_unfiltered_sampling_follows_the_distribution():
    probs = torch.tensor([0.7, 0.2, 0.1])
    reqs = [make(seed=s) for s in range(3000)]
    drawn = torch.tensor(sample(torch.log(probs).repeat(3000, 1), reqs))
    freq = torch.bincount(drawn, minlength=3).float() / 3000
    torch.testing.assert_close(freq, probs, atol=0.03, rtol=0)


def test_penalties_match_a_direct_computation():
    req = make(repetition_penalty=1.5, frequency_penalty=0.5, presence_penalty=0.25, logit_bias={"9": 2.0})
    req.output_ids = [3, 3, 5]
    logits = torch.linspace(-2, 2, 10)[None].clone()
    want = logits[0].clone()
    for t in {1, 2, 3, 5}:  # prompt and output tokens: repetition penalty
        want[t] = want[t] / 1.5 if want[t] > 0 else want[t] * 1.5
    want[3] -= 0.5 * 2 + 0.25
    want[5] -= 0.5 * 1 + 0.25
    want[9] += 2.0
    apply_penalties(logits, [req], eos_ids={0})
    torch.testing.assert_close(logits[0], want)


def test_min_new_tokens_bans_eos_and_stop_ids_until_reached():
    req = make(min_new_tokens=2, stop_token_ids=[4])
    logits = torch.zeros(1, 6)
    logits[0, 0] = logits[0, 4] = 10.0
    apply_penalties(logits, [req], eos_ids={0})
    assert logits[0, 0] == logits[0, 4] == float("-inf")
    req.output_ids = [1, 1]
    logits = torch.zeros(1, 6)
    apply_penalties(logits, [req], eos_ids={0})
    assert torch.all(logits == 0)


def test_stop_token_ids_outside_the_vocabulary_never_match():
    SamplingParams(stop_token_ids=[10**6, -5]).validate(vocab_size=1000)
    req = make(min_new_tokens=2, stop_token_ids=[10**6, -5, 4])
    logits = torch.zeros(1, 16)
    apply_penalties(logits, [req], eos_ids=set())
    assert logits[0, 4] == float("-inf") and torch.isfinite(logits[0, :4]).all()


@pytest.mark.parametrize(
    "params",
    [
        dict(logit_bias={"3": 1.0}), dict(repetition_penalty=1.2), dict(frequency_penalty=0.5), dict(presence_penalty=-0.5),
        dict(min_new_tokens=2, stop_token_ids=[2]), dict(temperature=0), dict(temperature=0.7, top_p=0.9, top_k=5),
    ],
)  # fmt: skip
def test_edits_logits_says_exactly_when_apply_penalties_changes_a_row(params):
    # The engine samples a plain batch from the logits themselves, uncopied: only a row edits_logits names may change.
    req = Req("r", [1, 2, 3], SamplingParams(max_new_tokens=4, **params), seed=0)
    req.output_ids = [3]
    logits = torch.randn(1, 8)
    edited = logits.clone()
    apply_penalties(edited, [req], eos_ids={2})
    assert edits_logits(req) == (not torch.equal(edited, logits))
