"""/metrics (--enable-metrics): SGLang's names and labels, token counters equal to what the responses said."""

import json
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

PROMPTS = ["Name a colour.", "Count to five:", "Name a colour."]  # the repeat is served from the cache


def scrape(url: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    resp = httpx.get(url + "/metrics", trust_env=False)  # open without a key, as /health
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(resp.text):
        for s in family.samples:
            samples.setdefault(s.name, []).append((s.labels, s.value))
    return samples


def total(samples: dict[str, Any], name: str, **labels: str) -> float:
    return sum(v for lab, v in samples.get(name, []) if all(lab.get(k) == x for k, x in labels.items()))


def test_token_counters_equal_the_responses(keyed_server):
    c = keyed_server.client
    before = scrape(keyed_server.url)
    metas = []
    for prompt in PROMPTS:
        resp = c.post("/generate", json={"text": prompt, "sampling_params": {"max_new_tokens": 5, "temperature": 0}})
        metas.append(resp.json()["meta_info"])
    batch = c.post("/generate", json={"text": PROMPTS[:2], "sampling_params": {"max_new_tokens": 3, "n": 2}}).json()
    metas += [r["meta_info"] for r in batch]
    streamed = []
    with c.stream("POST", "/generate", json={"text": PROMPTS[1], "stream": True, "sampling_params": {"max_new_tokens": 6}}) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: {"):
                streamed.append(json.loads(line[6:])["meta_info"])
    after = scrape(keyed_server.url)
    delta = lambda name, **lab: total(after, name, **lab) - total(before, name, **lab)  # noqa: E731

    everything = metas + streamed[-1:]
    assert delta("sglang:prompt_tokens_total") == sum(m["prompt_tokens"] for m in everything)
    assert delta("sglang:generation_tokens_total") == sum(m["completion_tokens"] for m in everything)
    assert delta("sglang:cached_tokens_total") == sum(m["cached_tokens"] for m in everything) > 0
    assert delta("sglang:num_requests_total", is_streaming="false") == len(metas)
    assert delta("sglang:num_requests_total", is_streaming="true") == 1
    assert delta("sglang:generation_tokens_total", is_streaming="true") == streamed[-1]["completion_tokens"]
    assert delta("sglang:e2e_request_latency_seconds_count") == len(everything)
    assert delta("sglang:time_to_first_token_seconds_count") == len(everything)
    assert delta("sglang:queue_time_seconds_count") == len(everything)
    # Every token after the first gives one inter-token interval.
    assert delta("sglang:inter_token_latency_seconds_count") == sum(m["completion_tokens"] - 1 for m in everything)


def test_sglang_names_and_labels(keyed_server):
    samples = scrape(keyed_server.url)
    for name in ("sglang:num_running_reqs", "sglang:num_queue_reqs", "sglang:num_used_tokens", "sglang:token_usage",
                 "sglang:cache_hit_rate", "sglang:gen_throughput", "sglang:num_retracted_reqs"):  # fmt: skip
        ((labels, value),) = samples[name]
        assert set(labels) == {"model_name", "engine_type", "tp_rank", "pp_rank", "moe_ep_rank"}
        assert value >= 0
    assert samples["sglang:num_running_reqs"][0][1] == 0
    assert 0 <= samples["sglang:token_usage"][0][1] <= 1 and 0 < samples["sglang:cache_hit_rate"][0][1] <= 1
    for name in ("sglang:prompt_tokens_total", "sglang:generation_tokens_total", "sglang:num_requests_total"):
        assert {lab["is_streaming"] for lab, _ in samples[name]} == {"true", "false"}
        assert all(set(lab) == {"model_name", "engine_type", "is_streaming"} for lab, _ in samples[name])
    bounds = [float(lab["le"]) for lab, _ in samples["sglang:time_to_first_token_seconds_bucket"] if lab["is_streaming"] == "false"]
    assert bounds[:4] == [0.1, 0.2, 0.4, 0.6] and bounds[-1] == float("inf")


def test_metrics_are_off_by_default(client):
    assert client.get("/metrics").status_code == 404
