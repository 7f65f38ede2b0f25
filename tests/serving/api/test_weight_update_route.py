"""POST /update_weights_from_disk over HTTP: SGLang's answers, a second checkpoint's own outputs, in-flight
requests finishing on the old weights, failures that change nothing, and pause/continue."""

import json
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from kiln.models.loader import resolve_checkpoint

PROMPT = "The three most useful kitchen tools are"
NEW_TOKENS = 12
LONG_TOKENS = 40


@pytest.fixture(scope="module")
def original() -> Path:
    return resolve_checkpoint(None, Path.home() / ".cache" / "kiln")


@pytest.fixture(scope="module")
def checkpoints(original: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """SmolLM2 with every weight scaled by (1 + 5% noise), and two broken copies of it."""
    root = tmp_path_factory.mktemp("checkpoints")
    weights = load_file(original / "model.safetensors")
    gen = torch.Generator().manual_seed(0)
    perturbed = {k: (v * (1 + 0.05 * torch.randn(v.shape, generator=gen))).contiguous() for k, v in weights.items()}
    paths = {name: root / name for name in ("perturbed", "wrong_shape", "wrong_arch")}
    for name, path in paths.items():
        path.mkdir()
        for f in original.iterdir():
            if f.suffix != ".safetensors":
                shutil.copy(f, path / f.name)
    save_file(perturbed, paths["perturbed"] / "model.safetensors")
    norm = "model.norm.weight"
    save_file({**perturbed, norm: perturbed[norm][:-1].clone()}, paths["wrong_shape"] / "model.safetensors")
    (paths["wrong_arch"] / "model.safetensors").symlink_to(paths["perturbed"] / "model.safetensors")
    cfg = json.loads((original / "config.json").read_text())
    (paths["wrong_arch"] / "config.json").write_text(json.dumps(cfg | {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}))
    return paths


def hf_greedy(folder: Path) -> list[int]:
    tok = AutoTokenizer.from_pretrained(folder)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = tok(PROMPT).input_ids
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False, min_new_tokens=NEW_TOKENS, pad_token_id=2)
    return out[0, len(ids) :].tolist()


@pytest.fixture(scope="module")
def reference(original: Path, checkpoints: dict[str, Path]) -> dict[str, list[int]]:
    """transformers' greedy tokens for PROMPT, from each checkpoint."""
    return {"original": hf_greedy(original), "perturbed": hf_greedy(checkpoints["perturbed"])}


def greedy(client: httpx.Client, n: int = NEW_TOKENS) -> dict[str, Any]:
    body = {"text": PROMPT, "sampling_params": {"temperature": 0, "max_new_tokens": n, "ignore_eos": True}}
    resp = client.post("/generate", json=body)
    assert resp.status_code == 200, resp.text
    return resp.json()


def stream_to_end(client: httpx.Client, tokens: int, started: threading.Event) -> dict[str, Any]:
    """Streams a greedy request of `tokens` tokens; sets `started` at its first chunk; returns its last chunk."""
    body = {"text": PROMPT, "stream": True, "sampling_params": {"temperature": 0, "max_new_tokens": tokens, "ignore_eos": True}}
    last: dict[str, Any] = {}
    with client.stream("POST", "/generate", json=body) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: {"):
                last = json.loads(line[6:])
                started.set()
    return last


def update(server: Any, body: dict[str, Any]) -> httpx.Response:
    return server.admin.post("/update_weights_from_disk", json=body)


def test_the_seed_examples_run_unmodified(keyed_server, original):
    # The seed's two examples, with the model path pointing at a local checkpoint (and the admin key).
    response = update(keyed_server, {"model_path": str(original)})
    assert response.json()["success"] is True
    assert response.json()["message"] == "Succeeded to update model weights."
    assert response.json() == {"success": True, "message": "Succeeded to update model weights.", "num_paused_requests": 0}

    response = update(keyed_server, {"model_path": "qwen/qwen2.5-0.5b-instruct-wrong"})
    response_json = response.json()
    assert response.status_code == 400
    assert response_json["success"] is False
    assert response_json["message"] == (
        "Failed to get weights iterator: "
        "qwen/qwen2.5-0.5b-instruct-wrong"
        " (repository not found)."
    )


def test_update_serves_the_new_checkpoint_and_its_version(keyed_server, original, checkpoints, reference):
    c = keyed_server.client
    before = greedy(c)
    assert before["output_ids"] == reference["original"]
    expected = reference["perturbed"]
    assert expected != before["output_ids"]
    try:
        response = update(keyed_server, {"model_path": str(checkpoints["perturbed"]), "weight_version": "step-100"})
        assert response.status_code == 200
        assert response.json() == {
            "success": True, "message": "Succeeded to update model weights. Weight version updated to step-100.", "num_paused_requests": 0,
        }  # fmt: skip
        after = greedy(c)
        assert after["output_ids"] == expected
        assert after["meta_info"]["weight_version"] == "step-100"
        assert after["meta_info"]["cached_tokens"] == 0  # the cache was flushed: its K/V came from the old weights
        info = c.get("/get_model_info").json()
        assert (info["model_path"], info["weight_version"]) == (str(checkpoints["perturbed"]), "step-100")
        assert c.get("/get_weight_version").json() == {"weight_version": "step-100"}
        assert c.get("/v1/models").json()["data"][0]["id"] == str(checkpoints["perturbed"])
    finally:
        assert update(keyed_server, {"model_path": str(original), "weight_version": "default"}).status_code == 200
    assert greedy(c)["output_ids"] == before["output_ids"]


@pytest.mark.parametrize(
    "name, message",
    [
        ("wrong_shape", "Failed to update weights: Attempted to load weight (torch.Size([575])) into parameter (torch.Size([576])).\nRolling back to original weights."),
        ("wrong_arch", "Failed to update weights: the checkpoint is a Qwen2ForCausalLM (Qwen2ForCausalLM) but the server runs LlamaForCausalLM.\nRolling back to original weights."),
        ("missing", "Failed to get weights iterator: {path} (no such model folder or file)."),
    ],
)
def test_a_failed_update_changes_nothing(keyed_server, checkpoints, name, message):
    c = keyed_server.client
    before, info = greedy(c), c.get("/get_model_info").json()
    path = checkpoints.get(name, Path("/no/such/checkpoint"))
    response = update(keyed_server, {"model_path": str(path), "weight_version": "never"})
    assert response.status_code == 400
    assert response.json() == {"success": False, "message": message.format(path=path), "num_paused_requests": 0}
    after = greedy(c)
    assert (after["text"], after["output_ids"]) == (before["text"], before["output_ids"])
    assert c.get("/get_model_info").json() == info


def test_requests_in_flight_finish_on_the_old_weights(keyed_server, original, checkpoints, reference):
    c = keyed_server.client
    old_long = greedy(c, LONG_TOKENS)["output_ids"]
    new_short = reference["perturbed"]
    first_chunk = threading.Event()
    times: dict[str, float] = {}

    def stream_long() -> dict[str, Any]:
        last = stream_to_end(c, LONG_TOKENS, first_chunk)
        times["stream_done"] = time.monotonic()
        return last

    def update_now() -> httpx.Response:
        response = update(keyed_server, {"model_path": str(checkpoints["perturbed"]), "weight_version": "v2"})
        times["update_done"] = time.monotonic()
        return response

    try:
        with ThreadPoolExecutor(3) as pool:
            streamed = pool.submit(stream_long)
            assert first_chunk.wait(60)
            updated = pool.submit(update_now)
            time.sleep(0.3)  # the update is waiting for the stream: this request waits for the update
            late = pool.submit(greedy, c)
            assert updated.result().json()["success"] is True
            stream_last = streamed.result()
            late_result = late.result()
        # The stream ran to its end on the old weights, and the update waited for it.
        assert stream_last["output_ids"] == old_long
        assert stream_last["meta_info"]["weight_version"] == "default"
        assert times["stream_done"] <= times["update_done"]
        # The request that arrived during the update ran on the new weights.
        assert late_result["output_ids"] == new_short
        assert late_result["meta_info"]["weight_version"] == "v2"
    finally:
        assert update(keyed_server, {"model_path": str(original), "weight_version": "default"}).status_code == 200


def test_abort_all_requests_ends_the_requests_in_flight(keyed_server, original, checkpoints):
    c = keyed_server.client
    started = threading.Event()
    try:
        with ThreadPoolExecutor(1) as pool:
            streamed = pool.submit(stream_to_end, c, 2000, started)
            assert started.wait(60)
            response = update(keyed_server, {"model_path": str(checkpoints["perturbed"]), "abort_all_requests": True})
            assert response.json()["success"] is True
            last = streamed.result(timeout=60)
        assert last["meta_info"]["finish_reason"]["type"] == "abort"
        assert len(last["output_ids"]) < 2000
    finally:
        assert update(keyed_server, {"model_path": str(original)}).status_code == 200


def test_pause_holds_new_requests_until_continue_and_an_update_runs_at_once(keyed_server, original, checkpoints, reference):
    c, admin = keyed_server.client, keyed_server.admin
    expected = reference["perturbed"]
    assert admin.post("/pause_generation", json={"mode": "retract"}).json() == {"message": "Generation paused successfully.", "status": "ok"}
    try:
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(greedy, c)
            time.sleep(1.0)
            assert not waiting.done()  # held back while paused
            assert update(keyed_server, {"model_path": str(checkpoints["perturbed"])}).json()["success"] is True
            assert not waiting.done()
            assert admin.post("/continue_generation").json() == {"message": "Generation continued successfully.", "status": "ok"}
            assert waiting.result(timeout=60)["output_ids"] == expected
    finally:
        admin.post("/continue_generation")
        assert update(keyed_server, {"model_path": str(original)}).status_code == 200


def test_pause_with_abort_ends_the_requests_in_flight(keyed_server):
    c, admin = keyed_server.client, keyed_server.admin
    started = threading.Event()
    try:
        with ThreadPoolExecutor(1) as pool:
            streamed = pool.submit(stream_to_end, c, 2000, started)
            assert started.wait(60)
            assert admin.post("/pause_generation", json={"mode": "abort"}).status_code == 200
            assert streamed.result(timeout=10)["meta_info"]["finish_reason"]["type"] == "abort"
    finally:
        assert admin.post("/continue_generation").status_code == 200
    assert len(greedy(c)["output_ids"]) == NEW_TOKENS


def test_bad_bodies_are_400s(keyed_server):
    admin = keyed_server.admin
    assert admin.post("/update_weights_from_disk", json={}).status_code == 400
    assert admin.post("/update_weights_from_disk", json={"model_path": 3}).status_code == 400
    response = admin.post("/update_weights_from_disk", json={"model_path": "x", "load_format": "pickle"})
    assert (response.status_code, response.json()["message"]) == (400, "Unknown load_format: pickle")
    assert admin.post("/pause_generation", json={"mode": "sleep"}).status_code == 400
