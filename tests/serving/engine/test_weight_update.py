"""Updating weights from disk in the engine: the new checkpoint's own outputs, and a wrong checkpoint (path,
architecture, shape, name) leaves the old weights serving untouched. (Compiled engines: tests/compiler.)"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from kiln.models.loader import resolve_checkpoint
from kiln.serving.engine.core import EngineCore
from kiln.serving.messages import GenerateRequest, UpdateWeights
from kiln.serving.sampling_params import SamplingParams
from kiln.serving.server_args import ServerArgs

PROMPTS = [[5, 9, 13, 70, 2], [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52], [3]]


def _checkpoint(folder: Path, seed: int, tokenizer_from: Path) -> None:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )  # fmt: skip
    LlamaForCausalLM(cfg).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_from).save_pretrained(folder)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("weights")
    tok = resolve_checkpoint(None, Path.home() / ".cache" / "kiln")
    paths = {name: root / name for name in ("a", "b", "wrong_shape", "wrong_arch", "extra_name")}
    _checkpoint(paths["a"], 0, tok)
    _checkpoint(paths["b"], 1, tok)
    for bad in ("wrong_shape", "wrong_arch", "extra_name"):
        shutil.copytree(paths["b"], paths[bad])
    weights = load_file(paths["b"] / "model.safetensors")
    save_file({**weights, "model.norm.weight": weights["model.norm.weight"][:-1].clone()}, paths["wrong_shape"] / "model.safetensors")
    save_file({**weights, "model.layers.0.mlp.extra.weight": torch.zeros(3)}, paths["extra_name"] / "model.safetensors")
    cfg = json.loads((paths["wrong_arch"] / "config.json").read_text())
    (paths["wrong_arch"] / "config.json").write_text(json.dumps(cfg | {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}))
    return paths


def _args(path: Path) -> ServerArgs:
    return ServerArgs(model_path=str(path), dtype="float32", max_total_tokens=2048, max_running_requests=6, disable_compile=True)


def greedy(core: EngineCore, n: int = 8, tag: str = "") -> list[list[int]]:
    for i, ids in enumerate(PROMPTS):
        core.add(GenerateRequest(f"{tag}{i}", ids, SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True)))
    out: dict[str, list[int]] = {}
    while core.has_work:
        for o in core.step():
            out.setdefault(o.rid, []).extend(o.new_ids)
    return [out[f"{tag}{i}"] for i in range(len(PROMPTS))]


@pytest.fixture(scope="module")
def references(ckpts: dict[str, Path]) -> dict[str, list[list[int]]]:
    return {name: greedy(EngineCore(_args(ckpts[name]))) for name in ("a", "b")}


@pytest.fixture(scope="module")
def engine(ckpts: dict[str, Path]) -> EngineCore:
    return EngineCore(_args(ckpts["a"]))


def test_update_serves_the_new_checkpoint(engine, ckpts, references):
    assert references["a"] != references["b"]
    assert greedy(engine) == references["a"]
    reply = engine.update_weights(UpdateWeights(str(ckpts["b"])))
    assert (reply.success, reply.message) == (True, "Succeeded to update model weights.")
    assert greedy(engine, tag="b") == references["b"]
    assert engine.update_weights(UpdateWeights(str(ckpts["a"]))).success
    assert greedy(engine, tag="a") == references["a"]


@pytest.mark.parametrize(
    "name, message",
    [
        ("wrong_shape", "Failed to update weights: Attempted to load weight (torch.Size([63])) into parameter (torch.Size([64])).\nRolling back to original weights."),
        ("wrong_arch", "Failed to update weights: the checkpoint is a Qwen2ForCausalLM (Qwen2ForCausalLM) but the server runs LlamaForCausalLM.\nRolling back to original weights."),
        ("extra_name", "Failed to update weights: checkpoint tensor 'layers.0.mlp.extra.weight' has no place in LlamaForCausalLM.\nRolling back to original weights."),
        ("missing", "Failed to get weights iterator: {path} (no such model folder or file)."),
    ],
)
def test_a_wrong_checkpoint_leaves_the_old_weights(engine, ckpts, references, name, message):
    path = ckpts.get(name, ckpts["a"].parent / "no-such-folder")
    weights = {k: v.clone() for k, v in engine.model.state_dict().items()}
    reply = engine.update_weights(UpdateWeights(str(path)))
    assert (reply.success, reply.message) == (False, message.format(path=path))
    assert all(torch.equal(v, weights[k]) for k, v in engine.model.state_dict().items())
    assert greedy(engine, tag=name) == references["a"]


def test_a_failure_while_copying_reads_the_old_checkpoint_back(engine, ckpts, references, monkeypatch):
    import kiln.serving.engine.weight_update as wu

    original = wu.iter_weights

    def failing(folder: Path):
        for i, item in enumerate(original(folder)):
            if folder == ckpts["b"] and i == 5:
                raise OSError("disk went away")
            yield item

    monkeypatch.setattr(wu, "iter_weights", failing)
    reply = engine.update_weights(UpdateWeights(str(ckpts["b"])))
    assert (reply.success, reply.message) == (False, "Failed to update weights: disk went away.\nRolling back to original weights.")
    assert greedy(engine, tag="r") == references["a"]


def run(core: EngineCore, out: dict[str, list[int]], steps: int | None = None) -> None:
    while core.has_work and (steps is None or steps > 0):
        for o in core.step():
            out.setdefault(o.rid, []).extend(o.new_ids)
        steps = None if steps is None else steps - 1


def test_an_update_during_an_in_place_pause_retracts_the_running_requests(ckpts):
    core = EngineCore(_args(ckpts["a"]))
    for i, ids in enumerate(PROMPTS):
        core.add(GenerateRequest(str(i), ids, SamplingParams(temperature=0, max_new_tokens=8, ignore_eos=True)))
    out: dict[str, list[int]] = {}
    run(core, out, steps=3)
    for o in core.pause("in_place"):  # with overlapped steps, the tokens of the step that was in flight
        out.setdefault(o.rid, []).extend(o.new_ids)
    heads = [list(out[str(i)]) for i in range(len(PROMPTS))]
    assert all(0 < len(h) < 8 for h in heads)
    assert len(core.scheduler.running) == len(PROMPTS)
    assert core.update_weights(UpdateWeights(str(ckpts["b"]))).success
    # Their K/V came from the old weights: freed, and the cache emptied.
    assert not core.scheduler.running and core.scheduler.cache.total_size() == 0
    assert core.pool.free_slots == core.pool.size
    core.resume()
    run(core, out)
    # The tokens sent before the update stay; the rest is what checkpoint b makes of prompt + those tokens.
    ref = EngineCore(_args(ckpts["b"]))
    for i, ids in enumerate(PROMPTS):
        ref.add(GenerateRequest(str(i), ids + heads[i], SamplingParams(temperature=0, max_new_tokens=8 - len(heads[i]), ignore_eos=True)))
    tails: dict[str, list[int]] = {}
    run(ref, tails)
    assert [out[str(i)] for i in range(len(PROMPTS))] == [heads[i] + tails[str(i)] for i in range(len(PROMPTS))]
