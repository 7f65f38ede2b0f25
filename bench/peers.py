"""The systems a serving benchmark compares, each started and stopped by the tool on 127.0.0.1.

Specs: `kiln` (as served by default), `kiln[--disable-compile --disable-radix-cache]` (a second launch
with extra flags, for ablations), `transformers` (one request at a time), `transformers-batched`
(static batches), `llama.cpp` (llama-cpp-python's server on the same GGUF; needs the [bench] extra).
"""

import importlib.util
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from kiln.serving.server_args import ServerArgs


@dataclass
class Peer:
    name: str
    command: list[str]
    health_path: str
    backend: str  # "native" (/generate) or "openai" (/v1/completions)
    extra_body: dict[str, Any] = field(default_factory=dict)


def make_peer(spec: str, port: int, dtype: str, checkpoint: Path, gguf: Path, eos_id: int) -> Peer:
    py = sys.executable
    if spec == "kiln" or spec.startswith("kiln["):
        flags = shlex.split(spec[5:-1]) if spec.startswith("kiln[") else []
        kiln = str(Path(py).with_name("kiln"))
        cmd = [kiln, "serve", "--host", "127.0.0.1", "--port", str(port), "--dtype", dtype, "--log-level", "warning", *flags]
        return Peer(spec, cmd, "/health", "native")
    if spec in ("transformers", "transformers-batched"):
        mode = "batched" if spec.endswith("batched") else "single"
        cmd = [py, "-m", "kiln.bench.hf_server", "--model", str(checkpoint), "--port", str(port), "--mode", mode, "--dtype", dtype]
        return Peer(spec, cmd, "/health", "native")
    if spec == "llama.cpp":
        if importlib.util.find_spec("llama_cpp") is None:
            raise SystemExit('llama.cpp peer: llama_cpp is not installed (pip install "llama-cpp-python[server]", or the [bench] extra)')
        threads = str(os.cpu_count() or 1)
        # --interrupt_requests False: by default the server cuts a running stream short when another request arrives.
        cmd = [py, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "4096", "--n_threads", threads, "--interrupt_requests", "False"]
        # It has no ignore_eos; a bias that rules EOS out makes every request run to max_tokens too.
        return Peer(spec, cmd, "/v1/models", "openai", {"logit_bias": {str(eos_id): -100.0}})
    raise SystemExit(f"unknown peer {spec!r}: use kiln, kiln[FLAGS], transformers, transformers-batched or llama.cpp")


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the peer's process group, then SIGKILL to whatever is left in it (Kiln's engine process, say)."""
    for sig, wait_s in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(wait_s)
        except subprocess.TimeoutExpired:
            pass


@contextmanager
def launched(peer: Peer, port: int, log_path: Path, timeout_s: float = 600.0) -> Iterator[str]:
    """Runs the peer until the block ends; yields its base URL once its health path answers 200.

    Every peer gets the same OpenMP spin count, Kiln's default (llama.cpp's and torch's CPU kernels both run
    on libgomp): libgomp's own default spins 3 ms, which on a small machine shared with the load generator
    made steps many times slower, and OMP_WAIT_POLICY=PASSIVE (used here before) makes every parallel
    region wait for sleeping threads to wake.
    """
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env["GOMP_SPINCOUNT"] = str(ServerArgs().omp_spin_count)
    base = f"http://127.0.0.1:{port}"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(peer.command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{peer.name} exited with {proc.returncode} while starting; see {log_path}")
            try:
                if httpx.get(base + peer.health_path, timeout=2, trust_env=False).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{peer.name} was not healthy after {timeout_s:.0f} s; see {log_path}")
            time.sleep(0.5)
        yield base
    finally:
        _stop(proc)
