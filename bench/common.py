"""What every benchmark records beside its figures: the machine, the commit, where results go, and a free port."""

import json
import os
import platform
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"


def write_result(result: dict[str, Any], default_name: str, out: str | Path | None = None) -> Path:
    """Writes a benchmark's JSON (to bench/results/<default_name> unless `out` says where) and says where."""
    path = RESULTS / default_name if out is None else Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {path}")
    return path


def machine() -> dict[str, Any]:
    import torch
    import transformers

    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")), platform.processor())
    mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
    return {
        "cpu": model,
        "cpus": os.cpu_count() or 1,
        "avx512_bf16": " avx512_bf16" in cpuinfo,
        "amx_bf16": " amx_bf16" in cpuinfo,
        "memory_gib": round(mem_kb / 2**20, 1),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def source_version() -> dict[str, Any]:
    """The commit measured, and whether the working tree differed from it."""
    git = ["git", "-C", str(Path(__file__).parent)]
    try:
        commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = bool(subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, check=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": dirty}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Launched:
    """A `kiln serve` started by `launch_kiln`: its process, base URL, and seconds from launch to /health 200."""

    proc: subprocess.Popen
    url: str
    to_healthy_s: float

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)


def launch_kiln(flags: list[str]) -> Launched:
    """Starts `kiln serve` on a free port with `flags` and returns once /health answers 200."""
    import httpx

    port = free_port()
    cmd = [str(Path(sys.executable).with_name("kiln")), "serve", "--port", str(port), "--log-level", "warning", *flags]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"kiln serve {' '.join(flags)} exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return Launched(proc, url, time.monotonic() - t0)
        except httpx.HTTPError:
            time.sleep(0.1)
