"""On a GPU: the whole engine (scheduler, compiled buckets, decode CUDA graphs, Triton attention) gives the
CPU engine's greedy tokens, and reports the graph memory it reserved before sizing the KV pool."""

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from kiln.serving.engine.core import EngineCore
from kiln.serving.messages import GenerateRequest
from kiln.serving.sampling_params import SamplingParams
from kiln.serving.server_args import ServerArgs

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


def tiny_checkpoint(folder) -> None:
    """A random Llama and a word-level tokenizer over its 96 ids, made here (no hub)."""
    torch.manual_seed(0)
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=96, hidden_size=128, intermediate_size=192, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
        )
    ).save_pretrained(folder)  # fmt: skip
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 96)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>").save_pretrained(folder)


def drive(core: EngineCore, prompts: dict[str, list[int]], new: int) -> dict[str, list[int]]:
    for rid, ids in prompts.items():
        core.add(GenerateRequest(rid, ids, SamplingParams(temperature=0, max_new_tokens=new, ignore_eos=True)))
    out: dict[str, list[int]] = {}
    while core.has_work:
        for o in core.step():
            out.setdefault(o.rid, []).extend(o.new_ids)
    return out


def test_cuda_engine_matches_cpu_engine(tmp_path):
    torch.backends.cuda.matmul.allow_tf32 = False
    tiny_checkpoint(tmp_path / "model")
    (tmp_path / "profile.toml").write_text(PROFILE)
    common = dict(model_path=str(tmp_path / "model"), dtype="float32", max_running_requests=8, chunked_prefill_size=32)
    cpu = EngineCore(ServerArgs(**common, device="cpu", max_total_tokens=4096, disable_compile=True))
    gpu = EngineCore(ServerArgs(**common, device="cuda", profile=str(tmp_path / "profile.toml"), compile_cache_dir=str(tmp_path / "cache")))
    prompts = {f"r{i}": [(7 * i + j) % 90 + 3 for j in range(3 + 9 * i)] for i in range(6)}  # 3 to 48 tokens: chunked
    assert drive(gpu, prompts, 24) == drive(cpu, prompts, 24)
    compile = gpu.stats().compile
    assert compile["cuda_graphs"] == 3 and compile["recompiles"] == 0 and compile["eager_fallbacks"] == 0
    assert compile["piece_cuda_graphs"] > 0
    assert compile["cuda_graph_reserved_mb"] > 0 and compile["cuda_graph_memory_mb"] > 0
    assert gpu.engine_info().device_resolved.startswith("cuda")
