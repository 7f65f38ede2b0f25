"""Start-up: launch of `kiln serve` to the first 200 from /health, cold and warm, against `--disable-compile`.

    .venv/bin/python -m kiln.bench.startup [--dtypes float32,bfloat16]   (or: kiln bench startup)

For each dtype, on a fresh compile cache: a cold start (everything compiled), a warm start (every piece
loaded from the cache), and two eager starts (`--disable-compile`): the first builds the kernel libraries an
eager engine needs (the int8 linears') into the cache, the second loads them and is the floor. The converted GGUF is
shared (converted once before timing; its conversion is timed separately, on a fresh cache folder).
Each start's breakdown (convert, load, pool sizing, compile, warm-up) comes from /get_server_info.
"""

import argparse
import json
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx

from kiln.bench.common import RESULTS, launch_kiln, machine, source_version
from kiln.models.loader import default_model_path, resolve_checkpoint


def launch(flags: list[str]) -> dict[str, Any]:
    """Seconds from launch to /health 200, and the engine's own start-up breakdown."""
    server = launch_kiln(flags)
    try:
        info = httpx.get(server.url + "/get_server_info", timeout=30).json()
    finally:
        server.stop()
    counters = info.get("compile", {})
    return {
        "to_healthy_s": round(server.to_healthy_s, 2),
        "engine": info["startup_seconds"],
        "cache_hits": counters.get("cache_hits"),
        "cache_misses": counters.get("cache_misses"),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kiln bench startup", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtypes", default="float32,bfloat16")
    args = p.parse_args(argv)
    result: dict[str, Any] = {"when": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(), "source": source_version()}
    with tempfile.TemporaryDirectory() as fresh:
        t0 = time.monotonic()
        resolve_checkpoint(str(default_model_path()), Path(fresh))
        result["gguf_conversion_s"] = round(time.monotonic() - t0, 2)
    resolve_checkpoint(None, Path.home() / ".cache" / "kiln")  # the shared converted checkpoint
    for dtype in args.dtypes.split(","):
        with tempfile.TemporaryDirectory() as cache:
            flags = ["--dtype", dtype, "--compile-cache-dir", cache]
            eager = [*flags, "--disable-compile"]
            runs = {"cold": launch(flags), "warm": launch(flags), "eager_first": launch(eager), "eager": launch(eager)}
        runs["warm_over_eager"] = round(runs["warm"]["to_healthy_s"] / runs["eager"]["to_healthy_s"], 2)
        result[dtype] = runs
        print(f"{dtype}: " + ", ".join(f"{k} {v['to_healthy_s']:.1f}s" for k, v in runs.items() if isinstance(v, dict)) + f"; warm/eager {runs['warm_over_eager']}x")
        for k in ("cold", "warm", "eager_first", "eager"):
            print(f"  {k:>11} engine: " + ", ".join(f"{n} {s:.1f}s" for n, s in runs[k]["engine"].items()))
    print(f"GGUF conversion (fresh cache folder): {result['gguf_conversion_s']:.1f}s")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"startup-{datetime.now():%Y%m%d-%H%M%S}.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
