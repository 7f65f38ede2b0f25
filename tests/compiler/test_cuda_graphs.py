"""On a GPU: decode replayed from CUDA graphs gives eager's greedy tokens, and eager CUDA matches the CPU."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kiln.bench.gpu_decode import DecodeLoop
from kiln.compiler.compiled_model import CompiledModel
from kiln.compiler.profile import Profile
from kiln.models.loader import load_model, read_config
from kiln.ops.attention import AttentionMetadata

pytestmark = pytest.mark.gpu

PROFILE = """
[buckets]
decode_batch_sizes = [2, 4, 8]
prefill_token_counts = [16, 64]
chunked_prefill_size = 64
piece_graph_max_tokens = 64
[inductor]
"triton.cudagraphs" = false
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("graphs")
    torch.manual_seed(0)
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=96, hidden_size=128, intermediate_size=192, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        )
    ).save_pretrained(root / "model")  # fmt: skip
    (root / "profile.toml").write_text(PROFILE)
    return root


def test_graph_replay_equals_eager(tiny):
    torch.backends.cuda.matmul.allow_tf32 = False
    cfg = read_config(tiny / "model")
    model = load_model(tiny / "model", cfg, torch.float32, torch.device("cuda"))
    loop = DecodeLoop(model, cfg, torch.float32, max_batch=5, max_context=40)
    compiled = CompiledModel(model, Profile.load(tiny / "profile.toml"))
    compiled.warm_up((loop.pool.k, loop.pool.v), loop.pool.req_to_token, show_progress=False)
    assert compiled.counters()["cuda_graphs"] == 3
    assert compiled.counters()["piece_cuda_graphs"] == 2 * compiled.stats.pieces  # buckets 16 and 64
    prompts = [[5, 6, 7], [9] * 11, [1, 2, 3, 4, 5, 6, 7], [40, 41], [3]]
    for batch in (1, 3, 5):  # decode buckets 2, 4 and 8, prefill buckets 16 and 64, with padding
        eager, _ = loop.run(model, prompts[:batch], 20)
        graphed, _ = loop.run(compiled, prompts[:batch], 20)
        assert graphed == eager
    counters = compiled.counters()
    assert counters["recompiles"] == 0 and counters["eager_fallbacks"] == 0


def test_eager_cuda_logits_match_cpu(tiny):
    cfg = read_config(tiny / "model")
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13]]
    logits = {}
    for device in ("cpu", "cuda"):
        model = load_model(tiny / "model", cfg, torch.float32, torch.device(device))
        shape = (cfg.num_hidden_layers, 65, cfg.num_key_value_heads, cfg.head_dim)
        kv = (torch.zeros(shape, device=device), torch.zeros(shape, device=device))
        table = torch.arange(1, 65, dtype=torch.int32, device=device).view(2, 32)  # slot 0 is scratch
        slots = torch.cat([table[0, :7], table[1, :2]])
        meta = AttentionMetadata.build(slots, table, [0, 1], [7, 2], [7, 2])
        ids = torch.tensor(sum(prompts, []), device=device)
        pos = torch.tensor(list(range(7)) + list(range(2)), device=device)
        with torch.inference_mode():
            logits[device] = model.compute_logits(model(ids, pos, kv, meta)).cpu()
    torch.testing.assert_close(logits["cuda"], logits["cpu"], atol=2e-3, rtol=2e-3)
