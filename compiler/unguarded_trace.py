"""Loading a saved Dynamo trace without building its guards.

torch.compiler.load_compiled_function rebuilds every guard of the trace (a Python guard tree over the model's
parameters and globals), about a second of a warm start, only for Kiln to switch their checks off: the compile
cache folder's key stands in for them (compiler/cache.py). This loads the same artifact and sets a stand-in
that refuses to check, so that nothing can silently rely on guards that were never built.
"""

from pathlib import Path
from typing import Any

from torch._dynamo.aot_compile import AOTCompiledFunction


class _NoGuards:
    """In place of the guard manager of a trace whose checks are off; a check means a caller turned them on."""

    def check(self, f_locals: dict[str, Any]) -> bool:
        raise RuntimeError("a trace loaded from the compile cache has no guards to check")

    check_verbose = check


class _UnguardedFunction(AOTCompiledFunction):
    def __post_init__(self) -> None:
        self._artifacts.guard_manager = _NoGuards()  # the parent builds guards only where there are none
        super().__post_init__()
        self.disable_guard_check()


def load_unguarded(path: Path) -> AOTCompiledFunction:
    """The traced function saved at `path` (by save_compiled_function), its guard checks off."""
    return _UnguardedFunction.deserialize(path.read_bytes())
