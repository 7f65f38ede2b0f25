"""A Dynamo backend that splits the traced model at attention and compiles each piece per bucket.

Dynamo traces the model once with symbolic token and request counts. The graph
is cut around every `kiln::attention` call; the attention calls stay as they
are (the op runs its own kernels), and every piece between two of them is
compiled by Inductor for each concrete bucket size the first time that size
runs, during warm-up. Pieces that differ only in which layer's weights they
take (weights are graph inputs) share one compiled artifact per size.
"""

import copy
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx
from torch._guards import TracingContext, tracing
from torch._inductor.compile_fx import compile_fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv
from torch.fx.passes.split_module import split_module

from kiln.compiler.cuda_graphs import PieceGraph
from kiln.ops.attention import attention_op

log = logging.getLogger(__name__)

ATTENTION = attention_op


class RecompileError(RuntimeError):
    """A shape outside the warmed-up buckets reached a compiled piece while serving."""


@dataclass
class CompileStats:
    pieces: int = 0
    unique_pieces: int = 0
    piece_compiles: int = 0
    compile_seconds: float = 0.0
    traces: int = 0
    frozen: bool = False
    # Piecewise CUDA graphs: bucket sizes that get them, the memory pool while a
    # capture pass runs, and the addresses of inputs that never move.
    graph_sizes: frozenset[int] = frozenset()
    capture_pool: Any = None
    static_ptrs: set[int] = field(default_factory=set, repr=False)
    piece_graphs: int = 0
    artifacts: dict[tuple[str, tuple[int, ...]], Callable[..., Any]] = field(default_factory=dict, repr=False)
    # CPU attention layers' (heads, head_dim, scale, sliding_window, logit_cap): their in-place decode kernels
    # compile in warm-up, before serving freezes compilation.
    decode_kinds: set[tuple[int, int, float, int, float]] = field(default_factory=set)
    distinct: list["Piece"] = field(default_factory=list, repr=False)  # one piece per distinct code


def _concrete(value: Any, size: int) -> int:
    if isinstance(value, torch.SymInt):
        expr = value.node.expr
        return int(expr.xreplace({s: size for s in expr.free_symbols}))
    return int(value)


def _example(value: Any, size: int) -> Any:
    """A zero input like the traced (fake) one, its symbolic sizes and strides evaluated at `size`."""
    if not isinstance(value, torch.Tensor):
        return _concrete(value, size)
    shape = [_concrete(s, size) for s in value.shape]
    stride = [_concrete(s, size) for s in value.stride()]
    return torch.empty_strided(shape, stride, dtype=value.dtype, device=value.device).zero_()


def _canonical(gm: fx.GraphModule) -> str:
    """Renames every node positionally so that layer-identical pieces have identical code."""
    for i, node in enumerate(gm.graph.nodes):
        node._rename(f"v{i}")
        if node.op == "placeholder":
            node.target = node.name
    gm.recompile()
    return hashlib.sha256(gm.code.encode()).hexdigest()


def _specialize(gm: fx.GraphModule, args: tuple[Any, ...]) -> fx.GraphModule:
    """A copy of the piece with its size inputs turned into constants, so Inductor sees static shapes."""
    out = fx.GraphModule(gm, copy.deepcopy(gm.graph))
    placeholders = [n for n in out.graph.nodes if n.op == "placeholder"]
    for node, value in zip(placeholders, args):
        if isinstance(value, int):
            for user in list(node.users):
                user.args = fx.node.map_arg(user.args, lambda a, n=node, v=value: v if a is n else a)
                user.kwargs = fx.node.map_arg(user.kwargs, lambda a, n=node, v=value: v if a is n else a)
            out.graph.erase_node(node)
    out.recompile()
    return out


class Piece(torch.nn.Module):
    """One compiled stretch between attention calls, dispatched on its integer (size) inputs."""

    def __init__(self, gm: fx.GraphModule, stats: CompileStats, inductor_options: dict[str, Any]):
        super().__init__()
        self.gm = gm
        self.key = _canonical(gm)
        self.stats = stats
        self.options = inductor_options
        self.graphs: dict[tuple[int, ...], PieceGraph] = {}

    def _compiled(self, args: tuple[Any, ...]) -> Callable[..., Any]:
        """The artifact for these inputs' sizes, compiled (or loaded from the persistent cache) on first use."""
        sizes = tuple(a for a in args if isinstance(a, int))
        fn = self.stats.artifacts.get((self.key, sizes))
        if fn is None:
            if self.stats.frozen:
                raise RecompileError(f"no compiled piece for sizes {sizes}: a batch was not padded to a warmed-up bucket")
            t0 = time.monotonic()
            # A tracing context with a shape env lets Inductor's FX graph cache
            # (the persistent one) take pieces compiled outside Dynamo.
            tensors = [a for a in args if not isinstance(a, int)]
            with tracing(TracingContext(FakeTensorMode(shape_env=ShapeEnv(), static_shapes=True))):
                compiled = compile_fx(_specialize(self.gm, args), tensors, config_patches=self.options)
            fn = lambda *a, _c=compiled: _c(*[x for x in a if not isinstance(x, int)])  # noqa: E731
            self.stats.compile_seconds += time.monotonic() - t0
            self.stats.piece_compiles += 1
            self.stats.artifacts[(self.key, sizes)] = fn
        return fn

    def precompile(self, size: int) -> None:
        """Compiles this piece for a bucket without running the model: the inputs are zeros shaped as the trace
        recorded them, with every symbolic size set to `size` (padding makes every per-row input bucket-long)."""
        self._compiled(tuple(_example(n.meta["example_value"], size) for n in self.gm.graph.nodes if n.op == "placeholder"))

    def forward(self, *args: Any) -> Any:
        sizes = tuple(a for a in args if isinstance(a, int))
        fn = self._compiled(args)
        if sizes and max(sizes) in self.stats.graph_sizes:
            graph = self.graphs.get(sizes)
            if graph is None and self.stats.capture_pool is not None:
                graph = self.graphs[sizes] = PieceGraph(fn, args, self.stats.static_ptrs, self.stats.capture_pool)
                self.stats.piece_graphs += 1
            if graph is not None:
                return graph(*args)
        return fn(*args)


def _lower_cpu_decode(node: fx.Node, stats: CompileStats) -> None:
    """On the CPU, attention decodes with Inductor's in-place kernel (ops/attention_decode_cpu.py) in a compiled
    model: the op's `inplace_decode` flag, set in the graph. Its warm-up needs the layer's constants as numbers:
    a scale Dynamo made symbolic (it does, once the same code ran with another value in this process) keeps
    the eager kernel."""
    q = node.args[0].meta["example_value"]
    scale, _causal, window, cap = node.args[13:17]
    if q.is_cuda or not all(isinstance(c, (int, float)) for c in (scale, window, cap)):
        return
    node.kwargs = {**node.kwargs, "inplace_decode": True}
    stats.decode_kinds.add((q.shape[1], q.shape[2], scale, window, cap))


def piecewise_backend(stats: CompileStats, inductor_options: dict[str, Any]) -> Callable[..., Any]:
    def backend(gm: fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        stats.traces += 1
        if stats.frozen:
            raise RecompileError("Dynamo traced the model again while serving")
        part, owner = 0, {}
        for node in gm.graph.nodes:
            if node.op in ("placeholder", "output"):
                continue
            if node.op == "call_function" and node.target is ATTENTION:
                owner[node] = part + 1
                part += 2
                _lower_cpu_decode(node, stats)
            else:
                owner[node] = part
        split = split_module(gm, None, lambda n: owner[n], keep_original_order=True)
        keys = set()
        for name, sub in list(split.named_children()):
            if any(n.target is ATTENTION for n in sub.graph.nodes):
                continue
            piece = Piece(sub, stats, inductor_options)
            if piece.key not in keys:
                stats.distinct.append(piece)
            keys.add(piece.key)
            setattr(split, name, piece)
            stats.pieces += 1
        stats.unique_pieces = len(keys)
        log.info("traced the model: %d compiled pieces (%d distinct) around attention", stats.pieces, len(keys))
        return split

    return backend
