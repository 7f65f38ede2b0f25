"""`kiln serve --load-format dummy` on a folder holding only config.json: ids in, ids out, and text is refused."""

import json

import httpx
import pytest

CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 96, "hidden_size": 64,
    "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "max_position_embeddings": 256,
}  # fmt: skip


@pytest.fixture(scope="module")
def dummy_server(launch_kiln, tmp_path_factory):
    folder = tmp_path_factory.mktemp("dummy_config")
    (folder / "config.json").write_text(json.dumps(CONFIG))
    args = ["--model-path", str(folder), "--load-format", "dummy", "--dtype", "float32", "--max-total-tokens", "1024", "--disable-compile"]
    with launch_kiln(args) as url, httpx.Client(base_url=url, timeout=120, trust_env=False) as c:
        yield c


def test_ids_generate_and_text_needs_a_tokenizer(dummy_server):
    params = {"temperature": 0.7, "sampling_seed": 5, "max_new_tokens": 8, "ignore_eos": True}
    out = dummy_server.post("/generate", json={"input_ids": [1, 2, 3], "sampling_params": params}).json()
    assert len(out["output_ids"]) == 8 and all(0 <= t < CONFIG["vocab_size"] for t in out["output_ids"])
    again = dummy_server.post("/generate", json={"input_ids": [1, 2, 3], "sampling_params": params}).json()
    assert again["output_ids"] == out["output_ids"]
    r = dummy_server.post("/generate", json={"text": "hi"})
    assert r.status_code == 400 and "Text input needs the tokenizer" in r.json()["error"]["message"]
    assert dummy_server.get("/get_server_info").json()["load_format"] == "dummy"
