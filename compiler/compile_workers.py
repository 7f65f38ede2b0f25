"""Compile workers: a cold CPU start shares its compiling with other processes.

Inductor compiles one piece at a time in its process, mostly in Python, and a C++ build at a time (a bucket's
C++-wrapper pieces are one build each), so one process keeps one core busy. Once the trace is saved, the rest
of a cold start is independent units of work, each saving its result in the compile cache folder: the decode
attention kernels, and each bucket's distinct pieces. Worker processes load the saved trace and take units
from the same ordered list as the server's process; a unit goes to whoever creates its claim file first
(an exclusive create, so no unit is done twice). The server's process then loads what the workers saved, and
compiles whatever a failed worker left.

Only on the CPU: on CUDA a second process would hold a CUDA context of its own in memory the KV pool was
sized to use, and Inductor compiles Triton kernels in parallel already.
"""

import logging
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from kiln.compiler.cache import use_cache_dir
from kiln.compiler.profile import Profile

log = logging.getLogger(__name__)

SPEC_FILE = "spec.pkl"

# ("decode", heads, head_dim): the CPU decode attention kernel for one layer kind; ("bucket", size): every
# distinct piece of one bucket.
Unit = tuple[object, ...]


@dataclass
class WorkSpec:
    """What a worker needs to do any unit: where the cache and trace are, the profile, the pool's layout."""

    cache_dir: Path
    profile: Profile
    units: list[Unit]
    kv_heads: int
    kv_dtype: torch.dtype


def default_workers() -> int:
    """One process per usable core beyond the server's own, at most three (each holds torch and Inductor,
    about 1 GB)."""
    return max(0, min(3, len(os.sched_getaffinity(0)) - 1))


def take(claims: Path, unit: Unit) -> bool:
    """Claims `unit` for this process; False if another took it first."""
    try:
        os.close(os.open(claims / "-".join(map(str, unit)), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


class Workers:
    """Worker processes started on a spec; `claims` is the folder their claim files (and the spec) go in."""

    def __init__(self, spec: WorkSpec, count: int):
        self.claims = Path(tempfile.mkdtemp(prefix="kiln-compile-"))
        (self.claims / SPEC_FILE).write_bytes(pickle.dumps(spec))
        cmd = [sys.executable, "-m", "kiln.compiler.compile_workers", str(self.claims)]
        self.procs = [subprocess.Popen(cmd) for _ in range(count)]
        log.info("%d compile workers share %d units of work with this process", count, len(spec.units))

    def wait(self) -> None:
        """Waits for every worker. A worker that failed is only logged: whatever it left unsaved, the server's
        process compiles."""
        for proc in self.procs:
            if proc.wait() != 0:
                log.warning("a compile worker exited with %d; this process compiles what it left", proc.returncode)
        shutil.rmtree(self.claims, ignore_errors=True)


def do_units(units: list[Unit], run: Callable[[Unit], None], claims: Path | None) -> int:
    """Runs each unit this process claims (every unit when `claims` is None); returns how many it ran."""
    done = 0
    for unit in units:
        if claims is None or take(claims, unit):
            run(unit)
            done += 1
    return done


def _work(claims: Path) -> None:
    from kiln.compiler.compiled_model import CompiledModel
    from kiln.models import loader  # noqa: F401  (registers every op a saved trace may call)

    spec: WorkSpec = pickle.loads((claims / SPEC_FILE).read_bytes())
    use_cache_dir(spec.cache_dir)
    # One compile at a time here: a worker is there to use one more core, not the server's.
    torch.set_num_threads(1)
    parent = os.getppid()
    compiled = CompiledModel(None, spec.profile, trace_dir=spec.cache_dir)  # type: ignore[arg-type]
    compiled.load_trace()

    def run(unit: Unit) -> None:
        if os.getppid() != parent:  # the server is gone: stop rather than compile for nobody
            sys.exit(1)
        compiled.do_unit(unit, spec.kv_heads, spec.kv_dtype)

    with torch.inference_mode():
        do_units(spec.units, run, claims)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    _work(Path(sys.argv[1]))
