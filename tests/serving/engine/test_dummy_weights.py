"""An engine serving dummy weights: it generates from ids without a tokenizer, one seed gives one model, and a
real checkpoint of the same shape can replace the dummy weights (a failed copy brings the dummy ones back)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kiln.serving.engine.core import EngineCore
from kiln.serving.messages import GenerateRequest, UpdateWeights
from kiln.serving.sampling_params import SamplingParams
from kiln.serving.server_args import ServerArgs

SHAPE = dict(
    vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
)  # fmt: skip
PROMPTS = [[5, 9, 13, 70, 2], [40, 41, 42, 43, 44, 45, 46], [3]]


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dummy")
    (root / "config").mkdir()
    (root / "config" / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama", **SHAPE}))
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**SHAPE)).save_pretrained(root / "real")
    return {"config": root / "config", "real": root / "real"}


def engine(path: Path, **args) -> EngineCore:
    return EngineCore(ServerArgs(model_path=str(path), dtype="float32", max_total_tokens=1024, max_running_requests=4, disable_compile=True, **args))


def greedy(core: EngineCore, tag: str = "") -> list[list[int]]:
    for i, ids in enumerate(PROMPTS):
        core.add(GenerateRequest(f"{tag}{i}", ids, SamplingParams(temperature=0, max_new_tokens=6, ignore_eos=True)))
    out: dict[str, list[int]] = {}
    while core.has_work:
        for o in core.step():
            out.setdefault(o.rid, []).extend(o.new_ids)
    return [out[f"{tag}{i}"] for i in range(len(PROMPTS))]


def test_a_config_folder_serves_ids_and_one_seed_gives_one_model(folders):
    a = engine(folders["config"], load_format="dummy", random_seed=1)
    assert a.tokenizer is None and not a.limits.has_tokenizer
    tokens = greedy(a)
    assert all(len(t) == 6 and all(0 <= x < SHAPE["vocab_size"] for x in t) for t in tokens)
    assert greedy(engine(folders["config"], load_format="dummy", random_seed=1)) == tokens
    other = engine(folders["config"], load_format="dummy", random_seed=2)
    assert not torch.equal(other.model.lm_head.weight, a.model.lm_head.weight)


def test_a_real_checkpoint_replaces_the_dummy_weights(folders, monkeypatch):
    core = engine(folders["config"], load_format="dummy", random_seed=1)
    dummy = greedy(core)
    real = greedy(engine(folders["real"], skip_tokenizer_init=True))
    assert real != dummy

    import kiln.serving.engine.weight_update as wu

    original = wu.iter_weights

    def failing(folder: Path):
        for i, item in enumerate(original(folder)):
            if i == 5:
                raise OSError("disk went away")
            yield item

    monkeypatch.setattr(wu, "iter_weights", failing)
    reply = core.update_weights(UpdateWeights(str(folders["real"])))
    assert (reply.success, reply.message) == (False, "Failed to update weights: disk went away.\nRolling back to original weights.")
    assert greedy(core, "back") == dummy  # the dummy weights, made again from their seed

    monkeypatch.setattr(wu, "iter_weights", original)
    assert core.update_weights(UpdateWeights(str(folders["real"]))).success
    assert greedy(core, "real") == real


def test_tokenizer_files_next_to_the_config_are_used(folders, tmp_path):
    from transformers import AutoTokenizer

    from kiln.models.loader import resolve_checkpoint

    tokenizer = AutoTokenizer.from_pretrained(resolve_checkpoint(None, Path.home() / ".cache" / "kiln"))
    tokenizer.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text((folders["config"] / "config.json").read_text())
    core = engine(tmp_path, load_format="dummy")
    assert core.tokenizer is not None and core.limits.has_tokenizer


def test_an_eager_engine_imports_neither_dynamo_nor_inductor(folders):
    """They cost about 3 s of a start; an engine that compiles nothing has no use for them."""
    code = (
        "import sys; from kiln.serving.engine.core import EngineCore; from kiln.serving.server_args import ServerArgs; "
        f"EngineCore(ServerArgs(model_path={str(folders['config'])!r}, load_format='dummy', dtype='float32', "
        "max_total_tokens=1024, disable_compile=True)); "
        "print([m for m in ('torch._dynamo', 'torch._inductor') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_xgrammar_is_imported_with_the_first_grammar(tmp_path):
    """Importing it and handing it the vocabulary cost about half a second of every start otherwise."""
    from transformers import AutoTokenizer

    from kiln.models.loader import resolve_checkpoint

    tokenizer = AutoTokenizer.from_pretrained(resolve_checkpoint(None, Path.home() / ".cache" / "kiln"))
    tokenizer.save_pretrained(tmp_path)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **SHAPE, "vocab_size": len(tokenizer)}
    (tmp_path / "config.json").write_text(json.dumps(config))
    code = (
        "import sys; from kiln.serving.engine.core import EngineCore; from kiln.serving.server_args import ServerArgs; "
        "from kiln.serving.messages import GenerateRequest; from kiln.serving.sampling_params import SamplingParams; "
        f"core = EngineCore(ServerArgs(model_path={str(tmp_path)!r}, load_format='dummy', dtype='float32', "
        "max_total_tokens=1024, disable_compile=True)); "
        "print('xgrammar' in sys.modules, core.grammars is not None); "
        "core.add(GenerateRequest('0', [1, 2, 3], SamplingParams(temperature=0, max_new_tokens=5, regex='[0-9]{5}'))); "
        "ids = [t for _ in iter(lambda: core.has_work, False) for o in core.step() for t in o.new_ids]; "
        "print('xgrammar' in sys.modules, repr(core.tokenizer.decode(ids)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    before, after = out.stdout.strip().splitlines()[-2:]
    assert before == "False True"  # a tokenizer and grammars, but no xgrammar yet
    imported, text = after.split(" ", 1)
    assert imported == "True" and re.fullmatch("'[0-9]{5}'", text), after


def test_an_eager_engine_keeps_its_kernel_libraries_in_the_cache_folder(folders, tmp_path, monkeypatch):
    """Inductor's cache (where the int8 linears' library is built) outlives the machine's /tmp: an eager start
    on a fresh machine builds it once, later ones load it."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "unset")  # restored after the test
    engine(folders["config"], load_format="dummy", cache_dir=str(tmp_path))
    assert Path(os.environ["TORCHINDUCTOR_CACHE_DIR"]) == tmp_path / "compile" / "eager"
