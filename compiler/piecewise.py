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
from pathlib import Path
from typing import Any

import sympy
import torch
from torch import fx
from torch._dynamo.aot_compile_types import SerializableCallable
from torch._guards import TracingContext, tracing
from torch._inductor import CompiledArtifact, standalone_compile
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx._graph_pickler import GraphPickler
from torch.fx._graph_pickler import Options as GraphPicklerOptions
from torch.fx.experimental.symbolic_shapes import ShapeEnv
from torch.fx.passes.fake_tensor_prop import FakeTensorProp
from torch.fx.passes.split_module import split_module

from kiln.compiler.cuda_graphs import PieceGraph
from kiln.compiler.quantized_linears import lower_quantized_linears
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
    # Where each compiled piece is saved as a standalone Inductor artifact (one file per piece and bucket),
    # and how many were loaded from there rather than compiled.
    artifact_dir: Path | None = None
    pieces_loaded: int = 0


# A piece input as the trace recorded it, in a form that pickles: ("int", size) or ("tensor", shape, stride,
# dtype, device), each size an int or a sympy expression (as text) of the bucket's symbolic token count.
InputSpec = tuple[Any, ...]


def _size_text(value: Any) -> int | str:
    return str(value.node.expr) if isinstance(value, torch.SymInt) else int(value)


def _spec(value: Any) -> InputSpec:
    if not isinstance(value, torch.Tensor):
        return ("int", _size_text(value))
    shape, stride = [_size_text(s) for s in value.shape], [_size_text(s) for s in value.stride()]
    return ("tensor", shape, stride, str(value.dtype).removeprefix("torch."), str(value.device))


def _concrete(value: int | str, size: int) -> int:
    if isinstance(value, int):
        return value
    expr = sympy.sympify(value)
    return int(expr.xreplace({s: size for s in expr.free_symbols}))


def _example(spec: InputSpec, size: int) -> Any:
    """A zero input like the traced one, its symbolic sizes and strides evaluated at `size`."""
    if spec[0] == "int":
        return _concrete(spec[1], size)
    _, shape, stride, dtype, device = spec
    shape, stride = [_concrete(s, size) for s in shape], [_concrete(s, size) for s in stride]
    return torch.empty_strided(shape, stride, dtype=getattr(torch, dtype), device=device).zero_()


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
    if "example_value" not in next(iter(out.graph.nodes)).meta:
        _add_example_values(out, [a for a in args if not isinstance(a, int)])
    return out


def _add_example_values(gm: fx.GraphModule, tensors: list[torch.Tensor]) -> None:
    """Fake values for each node of a piece loaded from a saved trace (whose metadata was left behind): Dynamo
    leaves them on a traced graph, and AOTAutograd's cache and Inductor's graph passes read them."""
    FakeTensorProp(gm, FakeTensorMode(allow_non_fake_inputs=True)).propagate(*tensors)
    for node in gm.graph.nodes:
        node.meta["example_value"] = node.meta.pop("val", None)


class Piece(torch.nn.Module):
    """One compiled stretch between attention calls, dispatched on its integer (size) inputs."""

    def __init__(self, gm: fx.GraphModule, inputs: list[InputSpec], stats: CompileStats, inductor_options: Callable[[int], dict[str, Any]]):
        super().__init__()
        self.gm = gm
        self.inputs = inputs
        self.key = _canonical(gm)
        self.stats = stats
        self.options = inductor_options
        self.graphs: dict[tuple[int, ...], PieceGraph] = {}

    def _compiled(self, sizes: tuple[int, ...], example: Callable[[], tuple[Any, ...]]) -> Callable[..., Any]:
        """The artifact for these sizes: loaded from the file an earlier start saved, else compiled for the
        inputs `example()` gives (Inductor's own caches may still serve it) and saved there, on first use."""
        fn = self.stats.artifacts.get((self.key, sizes))
        if fn is None:
            if self.stats.frozen:
                raise RecompileError(f"no compiled piece for sizes {sizes}: a batch was not padded to a warmed-up bucket")
            t0 = time.monotonic()
            options = self.options(max(sizes, default=0))
            saved = self._artifact_path(sizes)
            if saved is not None and saved.exists():
                # The saved artifact names its AOTAutograd cache entry: no inputs to make, no graph to
                # specialise, no fake values, no cache key to hash, which is most of a lookup through compile_fx.
                # Under the profile's options, as compiled: the C++ kernels' build flags (the vector ISA) come from them.
                with torch._inductor.config.patch(options):
                    compiled = _returning_as_traced(CompiledArtifact.load(path=str(saved)), self.gm)
                self.stats.pieces_loaded += 1
            else:
                compiled = self._compile(example(), saved, options)
            fn = lambda *a, _c=compiled: _c(*[x for x in a if not isinstance(x, int)])  # noqa: E731
            self.stats.compile_seconds += time.monotonic() - t0
            self.stats.piece_compiles += 1
            self.stats.artifacts[(self.key, sizes)] = fn
        return fn

    def _compile(self, args: tuple[Any, ...], saved: Path | None, options: dict[str, Any]) -> CompiledArtifact:
        tensors = [a for a in args if not isinstance(a, int)]
        # A tracing context with a shape env lets Inductor's FX graph cache (the persistent one) take pieces
        # compiled outside Dynamo; buckets whose pieces lower to the same graph share one Inductor compile.
        gm = _specialize(self.gm, args)
        if tensors[0].device.type == "cpu":
            lower_quantized_linears(gm, tensors)
        with tracing(TracingContext(FakeTensorMode(shape_env=ShapeEnv(), static_shapes=True))):
            compiled = standalone_compile(
                gm, tensors, dynamic_shapes="from_tracing_context", options={"config_patches": options},
                donate_graph_module=True,
            )  # fmt: skip
        if saved is not None:
            try:
                compiled.save(path=str(saved))
            except RuntimeError as exc:  # a piece AOTAutograd would not cache: later starts compile it again
                log.warning("piece %s not saved: %s", saved.name, exc)
        return compiled

    def _artifact_path(self, sizes: tuple[int, ...]) -> Path | None:
        if self.stats.artifact_dir is None:
            return None
        return self.stats.artifact_dir / f"piece-{self.key[:24]}-{'-'.join(map(str, sizes))}.bin"

    def is_saved(self, size: int) -> bool:
        """Whether an earlier start saved this piece's artifact for a bucket."""
        path = self._artifact_path(self._sizes(size))
        return path is not None and path.exists()

    def _sizes(self, size: int) -> tuple[int, ...]:
        return tuple(_concrete(spec[1], size) for spec in self.inputs if spec[0] == "int")

    def precompile(self, size: int) -> None:
        """Compiles this piece for a bucket without running the model: the inputs are zeros shaped as the trace
        recorded them, with every symbolic size set to `size` (padding makes every per-row input bucket-long)."""
        self._compiled(self._sizes(size), lambda: tuple(_example(spec, size) for spec in self.inputs))

    def forward(self, *args: Any) -> Any:
        sizes = tuple(a for a in args if isinstance(a, int))
        fn = self._compiled(sizes, lambda: args)
        if sizes and max(sizes) in self.stats.graph_sizes:
            graph = self.graphs.get(sizes)
            if graph is None and self.stats.capture_pool is not None:
                graph = self.graphs[sizes] = PieceGraph(fn, args, self.stats.static_ptrs, self.stats.capture_pool)
                self.stats.piece_graphs += 1
            if graph is not None:
                return graph(*args)
        return fn(*args)


def _returning_as_traced(compiled: CompiledArtifact, gm: fx.GraphModule) -> Callable[..., Any]:
    """Inductor compiles a graph returning one value as one returning a 1-tuple and unwraps the result; the
    unwrapping is not part of the saved artifact, so a loaded piece that returns one value does it here."""
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    if isinstance(output.args[0], (tuple, list)):
        return compiled
    return lambda *args: compiled(*args)[0]


def _lower_cpu_decode(node: fx.Node, decode_kinds: set[tuple[int, int, float, int, float]]) -> None:
    """On the CPU, attention decodes with Inductor's in-place kernel (ops/attention_decode_cpu.py) in a compiled
    model: the op's `inplace_decode` flag, set in the graph. Its warm-up needs the layer's constants as numbers:
    a scale Dynamo made symbolic (it does, once the same code ran with another value in this process) keeps
    the eager kernel."""
    q = node.args[0].meta["example_value"]
    scale, _causal, window, cap = node.args[13:17]
    if q.is_cuda or not all(isinstance(c, (int, float)) for c in (scale, window, cap)):
        return
    node.kwargs = {**node.kwargs, "inplace_decode": True}
    decode_kinds.add((q.shape[1], q.shape[2], scale, window, cap))


class PiecewiseGraph(SerializableCallable):
    """The traced model cut at attention, its pieces compiled per bucket. It pickles (the cut graph without
    its trace-time metadata, each piece's input shapes, the decode kernels it needs): torch.compile's
    aot_compile saves it with Dynamo's bytecode, so a warm start loads the trace instead of tracing again."""

    def __init__(
        self, split: fx.GraphModule, inputs: dict[str, list[InputSpec]], decode_kinds: set[tuple[int, int, float, int, float]],
        saved: fx.GraphModule | None,
    ):  # fmt: skip
        self.split = split
        self.inputs = inputs
        self.decode_kinds = decode_kinds
        # What serialize_compile_artifacts writes: the graph as cut (bind() turns split's pieces into Pieces).
        # A loaded trace has none: it is never saved again, and copying its graphs is a second of a warm start.
        self.saved = saved

    @staticmethod
    def cut(gm: fx.GraphModule) -> "PiecewiseGraph":
        """Cuts Dynamo's graph around every attention call (flagging the CPU's in-place decode on the way)."""
        decode_kinds: set[tuple[int, int, float, int, float]] = set()
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target is ATTENTION:
                _lower_cpu_decode(node, decode_kinds)
        split = _split(gm)
        inputs = {name: [_spec(n.meta["example_value"]) for n in sub.graph.nodes if n.op == "placeholder"] for name, sub in split.named_children()}
        return PiecewiseGraph(split, inputs, decode_kinds, _without_metadata(split))

    def bind(self, stats: CompileStats, inductor_options: Callable[[int], dict[str, Any]]) -> None:
        """Makes the pieces, which compile (or load) per bucket into `stats`."""
        keys = set()
        for name, sub in list(self.split.named_children()):
            if any(n.target is ATTENTION for n in sub.graph.nodes):
                continue
            piece = Piece(sub, self.inputs[name], stats, inductor_options)
            if piece.key not in keys:
                stats.distinct.append(piece)
            keys.add(piece.key)
            setattr(self.split, name, piece)
            stats.pieces += 1
        stats.unique_pieces = len(keys)
        stats.decode_kinds |= self.decode_kinds
        log.info("the model in %d compiled pieces (%d distinct) around attention", stats.pieces, len(keys))

    def __call__(self, *args: Any) -> Any:
        return self.split(*args)

    @classmethod
    def serialize_compile_artifacts(cls, fn: "PiecewiseGraph") -> bytes:
        if fn.saved is None:
            raise RuntimeError("a trace loaded from the cache is saved there already")
        # GraphPickler keeps each graph node for node (plain pickling re-traces the code, which would cut
        # the model differently); any op may appear, Kiln's own included.
        return GraphPickler.dumps((fn.saved, fn.inputs, fn.decode_kinds), GraphPicklerOptions(ops_filter=None))

    @classmethod
    def deserialize_compile_artifacts(cls, data: bytes) -> "PiecewiseGraph":
        split, inputs, decode_kinds = GraphPickler.loads(data, FakeTensorMode(shape_env=ShapeEnv()))
        split.recompile()  # GraphPickler brings back graphs without the code that runs them; this recompiles each child too
        return PiecewiseGraph(split, inputs, decode_kinds, None)


def _without_metadata(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of a graph module (and of its children) whose nodes carry no trace-time metadata, which does
    not pickle (fake tensors) and which nothing needs once the graph is cut."""
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    for node in graph.nodes:
        node.meta = {}
    return fx.GraphModule({name: _without_metadata(child) for name, child in gm.named_children()}, graph)


def _split(gm: fx.GraphModule) -> fx.GraphModule:
    """The graph in parts: the stretches between attention calls, and each attention call alone."""
    part, owner = 0, {}
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        if node.op == "call_function" and node.target is ATTENTION:
            owner[node] = part + 1
            part += 2
        else:
            owner[node] = part
    return split_module(gm, None, lambda n: owner[n], keep_original_order=True)


def piecewise_backend(stats: CompileStats, inductor_options: Callable[[int], dict[str, Any]]) -> Callable[..., Any]:
    def backend(gm: fx.GraphModule, example_inputs: list[Any]) -> PiecewiseGraph:
        stats.traces += 1
        if stats.frozen:
            raise RecompileError("Dynamo traced the model again while serving")
        graph = PiecewiseGraph.cut(gm)
        graph.bind(stats, inductor_options)
        return graph

    return backend
