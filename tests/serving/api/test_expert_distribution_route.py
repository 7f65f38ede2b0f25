"""/start|stop|dump_expert_distribution_record over HTTP: SGLang's answers, and dumps whose counts are exactly
transformers' router choices over the tokens the served requests ran; on a dense model, a 400 and no harm."""

import csv
from pathlib import Path

import httpx
import pytest
import torch
from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

LAYERS, EXPERTS, TOP_K = 3, 8, 2
REPLIES = {
    "start": "Start recording the expert distribution.\n",
    "stop": "Stop recording the expert distribution.\n",
    "dump": "Dump expert distribution record.\n",
}


@pytest.fixture(scope="module")
def moe_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Qwen2MoeForCausalLM]:
    """A tiny Qwen2-MoE with a shared expert and a dense middle layer, its router made decisive."""
    folder = tmp_path_factory.mktemp("qwen2_moe")
    torch.manual_seed(0)
    cfg = Qwen2MoeConfig(
        vocab_size=128, hidden_size=64, num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=96, moe_intermediate_size=32, shared_expert_intermediate_size=48, num_experts=EXPERTS,
        num_experts_per_tok=TOP_K, mlp_only_layers=[1], max_position_embeddings=256,
    )  # fmt: skip
    hf = Qwen2MoeForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("gate.weight"):
                p.normal_(0.0, 0.5)
    hf.save_pretrained(folder)
    return folder, hf


@pytest.fixture(scope="module")
def moe_server(launch_kiln, moe_model, tmp_path_factory):
    dumps = tmp_path_factory.mktemp("dumps")
    args = [
        "--model-path", str(moe_model[0]), "--skip-tokenizer-init", "--dtype", "float32", "--disable-compile",
        "--max-total-tokens", "2048", "--expert-distribution-recorder-mode", "stat",
        "--expert-distribution-recorder-dir", str(dumps),
    ]  # fmt: skip
    with launch_kiln(args) as url, httpx.Client(base_url=url, timeout=120, trust_env=False) as client:
        yield client, dumps


def recorder(client: httpx.Client, action: str, method: str = "POST") -> None:
    resp = client.request(method, f"/{action}_expert_distribution_record")
    assert resp.status_code == 200, resp.text
    assert resp.text == REPLIES[action]


def dump(client: httpx.Client, dumps: Path) -> torch.Tensor:
    """The counts of a dump, checked against the CSV written beside them."""
    before = set(dumps.glob("*.pt"))
    recorder(client, "dump")
    (path,) = set(dumps.glob("*.pt")) - before
    assert path.name.startswith("expert_distribution_recorder_")
    record = torch.load(path)
    assert set(record) == {"rank", "logical_count"} and record["rank"] == 0
    counts = record["logical_count"]
    assert counts.shape == (LAYERS, EXPERTS) and not counts.is_floating_point()
    with path.with_suffix(".csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(int(r["layer_id"]), int(r["expert_id"]), int(r["count"])) for r in rows] == [
        (layer, e, int(counts[layer, e])) for layer in range(LAYERS) for e in range(EXPERTS)
    ]
    return counts


def generate(client: httpx.Client, ids: list[int], new_tokens: int) -> list[int]:
    body = {"input_ids": ids, "sampling_params": {"temperature": 0, "max_new_tokens": new_tokens, "ignore_eos": True}}
    resp = client.post("/generate", json=body)
    assert resp.status_code == 200, resp.text
    return resp.json()["output_ids"]


def hf_counts(hf: Qwen2MoeForCausalLM, sequences: list[list[int]]) -> torch.Tensor:
    counts = torch.zeros(LAYERS, EXPERTS, dtype=torch.int64)
    for seq in sequences:
        with torch.no_grad():
            router_logits = hf(torch.tensor([seq]), output_router_logits=True).router_logits
        for layer, logits in zip((0, 2), router_logits, strict=True):  # layer 1 is dense
            counts[layer] += torch.bincount(logits.topk(TOP_K, dim=-1).indices.flatten(), minlength=EXPERTS)
    return counts


def test_dump_with_nothing_recorded_writes_zeros(moe_server):
    client, dumps = moe_server
    generate(client, [5, 6, 7], 3)  # not recording: not in any dump
    assert not dump(client, dumps).any()


def test_counts_are_the_routers_choices_over_the_recorded_requests(moe_server, moe_model):
    client, dumps = moe_server
    hf = moe_model[1]
    prompts = [[3, 17, 99, 5, 42, 7, 1, 64], [11, 12, 13, 120, 77]]
    recorder(client, "start", "GET")
    recorder(client, "start")  # again: starts over, harmlessly
    outputs = [generate(client, p, 6) for p in prompts]
    recorder(client, "stop", "GET")
    generate(client, [9, 8, 7, 6], 4)  # after stop: not counted
    counts = dump(client, dumps)
    # Every token the model ran: each prompt, and each output token but the last (which was never fed back).
    want = hf_counts(hf, [p + out[:-1] for p, out in zip(prompts, outputs)])
    assert torch.equal(counts, want)
    assert counts.sum() == TOP_K * 2 * sum(len(p) + 5 for p in prompts)  # two sparse layers
    assert not dump(client, dumps).any()  # a dump starts the counts over


def test_a_dense_model_answers_400_and_keeps_serving(client, generate):
    for action in ("start", "stop", "dump"):
        resp = client.post(f"/{action}_expert_distribution_record")
        assert resp.status_code == 400
        assert "Please set ServerArgs.expert_distribution_recorder_mode to use ExpertDistributionRecorder." in resp.text
    assert generate({"text": "Hello", "sampling_params": {"max_new_tokens": 2}})["meta_info"]["completion_tokens"] == 2
