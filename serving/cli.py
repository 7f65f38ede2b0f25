"""The `kiln` command: `kiln serve` starts the engine process, then the HTTP server."""

import argparse
import importlib
import json
import logging
import sys
from collections.abc import Callable

from kiln.serving.server_args import ServerArgs

log = logging.getLogger("kiln")


def serve(argv: list[str]) -> int:
    """Serves until SIGTERM (exit 0 after draining) or an engine's death (exit 1); a node other than 0
    (--node-rank) runs its tensor-parallel ranks headless."""
    args = ServerArgs.from_cli(argv)
    logging.basicConfig(level=args.log_level.upper(), format="[%(asctime)s] %(message)s")
    if args.node_rank > 0:
        from kiln.serving.engine.headless import run_headless

        return run_headless(args)
    from kiln.serving.api.engine_client import EngineStartError
    from kiln.serving.api.engine_group import EngineGroup
    from kiln.serving.messages import CheckpointLocated

    tokenizer = None

    def http_side(located: Callable[[], CheckpointLocated]) -> None:
        """This process's own start-up while the engines start: its modules (while the engines import theirs,
        on the other core), then the tokenizer, once the engine has found the checkpoint."""
        nonlocal tokenizer
        import uvicorn  # noqa: F401  (used once the engines are ready)

        import kiln.serving.api.server  # noqa: F401
        from kiln.serving.api.app import load_http_tokenizer
        from kiln.serving.tokenizer import import_tokenizer_classes

        import_tokenizer_classes()
        tokenizer = load_http_tokenizer(args, located())

    try:
        engine = EngineGroup.start(args, http_side)
    except EngineStartError as exc:
        log.error("could not start: %s", exc)
        return 1
    import uvicorn

    from kiln.serving.api.app import create_app
    from kiln.serving.api.server import KilnServer, protocol_with_timeout

    config = uvicorn.Config(
        create_app(args, engine, tokenizer), host=args.host, port=args.port, log_level=args.log_level,
        http=protocol_with_timeout(args.http_read_timeout), timeout_keep_alive=args.timeout_keep_alive,
        # Requests were drained or aborted before uvicorn's own wait: only their last bytes remain.
        timeout_graceful_shutdown=5,
    )  # fmt: skip
    server = KilnServer(config, engine, args.graceful_shutdown_timeout)
    server.run()
    engine.shutdown()
    return 1 if engine.dead or not server.started else 0


WARM_HELP = """\
Compiles every shape bucket of the model into the persistent compile cache, then exits, so that a later
`kiln serve` with the same model, dtype, device, profile and flags loads every piece and compiles nothing:
it saves Dynamo's trace of the model (dynamo-trace.bin), each compiled piece per bucket (piece-*.bin) and
Inductor's caches (with the built CPU decode attention kernel) in the cache folder, and a GGUF's converted
checkpoint, Q4_1 blocks and their packed int4 layers (per dtype and torch version) under <--cache-dir>/gguf.

The cache lives in --compile-cache-dir (default: <--cache-dir>/compile, i.e. ~/.cache/kiln/compile), one
folder per key (model config, dtype, device, profile, torch and Kiln versions); converted GGUF checkpoints
live in <--cache-dir>/gguf. To reuse the cache on another machine with the same CPU or GPU and the same
versions (an image build step, a CI cache), copy the whole --cache-dir (or both folders) to the same path
there, or point --cache-dir / --compile-cache-dir at the copy. It prints the compile counters and the
start-up breakdown in seconds.
"""


def warm(argv: list[str]) -> int:
    """Compiles every bucket into the persistent cache, then exits."""
    args = ServerArgs.from_cli(argv, "kiln warm", WARM_HELP)
    if args.disable_compile:
        log.error("kiln warm compiles; drop --disable-compile")
        return 2
    logging.basicConfig(level=args.log_level.upper(), format="[%(asctime)s] %(message)s")
    from kiln.serving.engine.core import EngineCore

    core = EngineCore(args)
    print(json.dumps({"compile": core.compiled.counters(), "startup_seconds": core.startup}, indent=2))
    return 0


BENCHMARKS = {
    "serve": "kiln.bench.serve", "offline": "kiln.bench.offline", "one-batch": "kiln.bench.one_batch",
    "startup": "kiln.bench.startup", "moe": "kiln.bench.moe", "cpu-attention": "kiln.bench.cpu_attention",
    "dp-routing": "kiln.bench.dp_routing",
}  # fmt: skip


def bench(argv: list[str]) -> int:
    """`kiln bench serve|offline|one-batch|startup|moe|cpu-attention|dp-routing ...`: runs that benchmark's main with the rest of the arguments."""
    if not argv or argv[0] not in BENCHMARKS:
        print(f"usage: kiln bench {{{','.join(BENCHMARKS)}}} [--help | options]", file=sys.stderr)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    return importlib.import_module(BENCHMARKS[argv[0]]).main(argv[1:])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="kiln", description="Kiln: serve language models over SGLang's HTTP API")
    parser.add_argument(
        "command",
        choices=["serve", "warm", "bench"],
        help="serve: start the HTTP server; warm: fill the compile cache and exit; bench: serve|offline|one-batch|startup|moe|cpu-attention|dp-routing benchmarks (kiln <command> --help)",
    )
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    ns, rest = parser.parse_known_args(argv[:1])
    return {"serve": serve, "warm": warm, "bench": bench}[ns.command](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
