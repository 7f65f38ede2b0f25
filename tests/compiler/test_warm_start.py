"""`kiln warm` fills the persistent cache (with a compile worker); a second start in a fresh process loads every
piece and compiles none, the decode buckets' pieces built with Inductor's C++ wrapper included."""

import json
import subprocess
import sys
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from kiln.models.loader import resolve_checkpoint

PROFILE = """
[buckets]
decode_batch_sizes = [1, 4]
prefill_token_counts = [32]
chunked_prefill_size = 32
[inductor]
"cpp.simdlen" = 0
[small_buckets]
max_tokens = 4
inductor = { cpp_wrapper = true }
"""


def kiln_warm(args: list[str]) -> dict:
    exe = Path(sys.executable).with_name("kiln")
    done = subprocess.run([str(exe), "warm", *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def test_a_warm_start_compiles_nothing(tmp_path):
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )  # fmt: skip
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "model")
    AutoTokenizer.from_pretrained(resolve_checkpoint(None, Path.home() / ".cache" / "kiln")).save_pretrained(tmp_path / "model")
    (tmp_path / "profile.toml").write_text(PROFILE)
    args = [
        "--model-path", str(tmp_path / "model"), "--dtype", "float32", "--max-total-tokens", "1024",
        "--profile", str(tmp_path / "profile.toml"), "--compile-cache-dir", str(tmp_path / "cache"), "--log-level", "warning",
    ]  # fmt: skip
    cold = kiln_warm([*args, "--compile-workers", "1"])
    built = sorted((tmp_path / "cache").rglob("*.so"))
    warm = kiln_warm(args)
    # No C++ kernel was built again: the warm start loaded each piece with the build flags it was compiled with.
    assert built and sorted((tmp_path / "cache").rglob("*.so")) == built
    assert cold["compile"]["cache_misses"] > 0
    assert warm["compile"]["cache_misses"] == 0
    # Dynamo's trace was loaded, not traced again; every piece of every bucket was loaded from the cache, as
    # many as the cold start compiled, and so was the CPU decode kernel (one per layer kind).
    assert not cold["compile"]["trace_loaded"] and warm["compile"]["trace_loaded"]
    assert warm["compile"]["cache_hits"] == warm["compile"]["piece_compiles"] == cold["compile"]["piece_compiles"]
    # Each from the artifact the cold start saved for it, not through a cache lookup by graph. The cold start
    # shared its work with one compile worker: it loaded the pieces of the buckets the worker compiled.
    assert cold["compile"]["compile_workers"] == 1 and warm["compile"]["compile_workers"] == 0
    assert cold["compile"]["pieces_loaded"] == cold["compile"]["buckets_by_workers"] * cold["compile"]["distinct_pieces"]
    assert warm["compile"]["pieces_loaded"] == warm["compile"]["piece_compiles"] and warm["compile"]["cpu_decode_kernels_loaded"] == 1
    assert warm["compile"]["buckets_compiled"] == 3 and warm["compile"]["recompiles"] == 0
    assert set(warm["startup_seconds"]) == {"convert", "load", "pool_sizing", "compile", "warm_up", "total"}


def test_kiln_warm_help_says_where_the_cache_lives_and_how_to_move_it():
    exe = Path(sys.executable).with_name("kiln")
    text = subprocess.run([str(exe), "warm", "--help"], capture_output=True, text=True, timeout=120).stdout
    assert "~/.cache/kiln/compile" in text and "copy" in text and "--compile-cache-dir" in text
