"""What RetrofitTracer does faster than fx, checked against fx's own answers.

The tracer finds parameter names from a map built once per trace and answers "is this a tuple
unpack?" from a per-code-object table (``capture/trace.py``); the graphs must be the ones fx's
per-access scans and disassemblies give: the same get_attr names (tied parameters, a child's
parameter read by its owner, one registered while the forward runs) and the same unpacks, in
symbolic and in specialised traces. Inside a ``trace_session`` (``capture/patching.py``) the
traces share one patching of ``nn.Module``, and must read the same graphs as alone, with fx's
own traces still working around and inside them.
"""

from __future__ import annotations

import dis
import linecache
import operator
import threading

import pytest
import torch
import torch.fx as fx
import torch.fx._symbolic_trace as fx_trace
from torch import nn

import retrofit
from retrofit.capture.calls import Call
from retrofit.capture.patching import trace_session
from retrofit.capture.trace import trace_graph


def get_attrs(graph: fx.Graph) -> list[str]:
    return [str(n.target) for n in graph.nodes if n.op == "get_attr"]


class Tied(nn.Module):
    """A decoder tied to its embedding (``b.weight is a.weight``) and a child's parameters read
    by the owner's own code, each twice."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.b.weight = self.a.weight
        self.scale = nn.Parameter(torch.ones(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.b.weight + self.b.bias
        y = y @ self.a.weight.t() * self.scale
        return y * self.scale + self.b.bias


def test_parameter_reads_get_fx_s_names_tied_first_one_node_each():
    model = Tied()
    ours = trace_graph(model, shallow=True).graph
    # fx's own answer: the first name named_parameters() gives, one node per name
    theirs = fx.symbolic_trace(model).graph
    assert get_attrs(ours) == get_attrs(theirs) == ["a.weight", "b.bias", "scale"]


class Registers(nn.Module):
    """Registers a parameter while its forward runs, after reading another one."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x * self.w
        self.late = nn.Parameter(torch.full((3,), 2.0))
        return y + self.late


def test_a_parameter_registered_during_the_trace_is_still_a_get_attr():
    model = Registers()
    graph = trace_graph(model).graph
    assert get_attrs(graph) == ["w", "late"]
    assert not hasattr(model, "late")  # the trace changed nothing (capture/sandbox.py)


def test_a_trace_lists_the_parameters_once_not_at_every_read(monkeypatch):
    model = nn.Sequential(*[Tied() for _ in range(3)])
    listed = []
    original = nn.Module.named_parameters

    def counting(self, *args, **kwargs):
        listed.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(nn.Module, "named_parameters", counting)
    graph = trace_graph(model).graph
    assert len(get_attrs(graph)) == 9
    assert listed.count(model) == 1


class Unpacks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(4, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).reshape(2, 3, 4).unbind(1)
        n, c = x.shape
        first, *rest = (q, k, v)
        return first * k + v.sum() * n + rest[1]


def unbound(graph: fx.Graph) -> list[tuple[str, int]]:
    return [
        (n.args[0].name, n.args[1])
        for n in graph.nodes
        if n.op == "call_function" and n.target is operator.getitem
    ]


@pytest.mark.parametrize("specialised", [False, True])
def test_tuple_unpacks_of_proxies_are_indexed_as_fx_indexes_them(specialised, monkeypatch):
    model = Unpacks()
    x = torch.randn(2, 4)
    disassembled = []
    original = dis.get_instructions

    def counting(code, *args, **kwargs):
        disassembled.append(code)
        return original(code, *args, **kwargs)

    monkeypatch.setattr(dis, "get_instructions", counting)
    call = Call((x,), {}) if specialised else None
    graph = trace_graph(model, call=call).graph
    # q, k, v from unbind's three; n, c from the shape's two, in both kinds of trace (an
    # unpack is not an iteration the tracer must answer: no concrete shape is asked for)
    assert unbound(graph) == [
        ("unbind", 0),
        ("unbind", 1),
        ("unbind", 2),
        ("getattr_1", 0),
        ("getattr_1", 1),
    ]
    out = fx.GraphModule(model, graph)(x)
    torch.testing.assert_close(out[0] if specialised else out, model(x))
    # Two unpacks of proxies in the forward: its code is disassembled once at most.
    assert disassembled.count(Unpacks.forward.__code__) <= 1
    trace_graph(model, call=call)
    assert disassembled.count(Unpacks.forward.__code__) <= 1


def test_iterating_a_proxy_outside_an_unpack_still_asks_the_tracer():
    class Loops(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return sum(t for t in x.unbind(0))

    x = torch.randn(3, 2)
    with pytest.raises(fx.proxy.TraceError, match="iterated"):
        trace_graph(Loops())
    graph = trace_graph(Loops(), call=Call((x,), {})).graph
    torch.testing.assert_close(fx.GraphModule(Loops(), graph)(x)[0], x.sum(0))


# --- one patching of nn.Module per apply (capture/patching.py) ----------------------------------


class Sizes(nn.Module):
    """Branches on the shape of a child's output, so a specialised trace runs the child for
    real while the trace is running, and reads a child's parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.f = nn.Conv2d(3, 4, 3, stride=2)
        self.g = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.f(x)
        if y.shape[-1] % 2:
            y = torch.nn.functional.pad(y, (0, 1))
        return self.g(y.mean((2, 3))) * self.g.weight.sum()


def shape_of(graph: fx.Graph) -> list[tuple[str, str]]:
    return [(n.op, getattr(n.target, "__name__", str(n.target))) for n in graph.nodes]


@pytest.fixture
def class_patches(monkeypatch):
    """The methods fx assigns on classes (nn.Module's __call__ and __getattr__), by name."""
    made: list[str] = []
    original = fx_trace._PatchedFnSetAttr.patch

    def counting(self):
        made.append(self.fn_name)
        return original(self)

    monkeypatch.setattr(fx_trace._PatchedFnSetAttr, "patch", counting)
    return made


def test_traces_in_a_session_patch_nn_module_once_and_read_the_same_graphs(class_patches):
    x = torch.randn(2, 3, 11, 11)
    call = Call((x,), {})
    # Symbolic (whole model, one owner) and specialised traces; the specialised ones run
    # ``self.f`` for real in the middle of the trace to learn the shape it branches on.
    kinds = [
        (Tied(), {}),
        (Tied(), {"shallow": True}),
        (Sizes(), {"call": call}),
        (Sizes(), {"shallow": True, "call": call}),
    ]
    outside = [shape_of(trace_graph(model, **kind).graph) for model, kind in kinds]
    # fx's own patching, once a trace, and again after each real run of a child (fx's patches
    # are reverted for it): 4 + 2
    assert class_patches.count("__call__") == 6
    methods = (nn.Module.__call__, nn.Module.__getattr__)
    with trace_session():
        assert nn.Module.__call__ is not methods[0]
        inside = [shape_of(trace_graph(model, **kind).graph) for model, kind in kinds]
    assert inside == outside
    assert ("call_function", "pad") in inside[3]  # 11 -> 5: odd, padded
    assert ("get_attr", "g.weight") in inside[3]
    assert class_patches.count("__call__") == 6  # none in the session
    assert (nn.Module.__call__, nn.Module.__getattr__) == methods


def test_apply_patches_nn_module_for_none_of_its_traces(class_patches):
    model = Sizes()
    retrofit.plan(model, {"stochastic_depth": {}}, example_input=torch.randn(2, 3, 9, 9))
    assert class_patches == []


def test_without_the_fx_internals_a_session_leaves_fx_to_patch_per_trace(
    class_patches, monkeypatch
):
    """A torch whose fx lacks what the dispatchers stand in for gets no session: the same
    plan, with fx patching around each trace as outside one."""
    from retrofit.capture import patching

    model = Sizes()
    x = torch.randn(2, 3, 9, 9)
    fast = retrofit.plan(model, {"stochastic_depth": {}}, example_input=x).to_dict()
    monkeypatch.setattr(patching, "SUPPORTED", False)
    own = nn.Module.__dict__["__call__"]
    with trace_session():
        assert nn.Module.__dict__["__call__"] is own  # nothing installed
    slow = retrofit.plan(model, {"stochastic_depth": {}}, example_input=x).to_dict()
    assert slow == fast and class_patches.count("__call__") > 0


class TracesInside(nn.Module):
    """Runs a plain fx trace of its child inside its own forward (its graphs: ``inner``)."""

    def __init__(self, inner: list[fx.Graph]) -> None:
        super().__init__()
        self.child = Tied()
        self.record = inner.append  # not the list: a trace puts the model's lists back

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        traced = fx.symbolic_trace(self.child)
        self.record(traced.graph)
        return traced(x) + self.child(x)


def test_an_fx_trace_inside_a_session_or_inside_a_retrofit_trace_patches_for_itself():
    alone = shape_of(fx.symbolic_trace(Tied()).graph)
    assert ("get_attr", "a.weight") in alone
    with trace_session():
        assert shape_of(fx.symbolic_trace(Tied()).graph) == alone
        # The inner trace runs while the outer one routes module calls to its own tracer.
        inner: list[fx.Graph] = []
        graph = trace_graph(TracesInside(inner), shallow=True).graph
        assert shape_of(fx.symbolic_trace(Tied()).graph) == alone
    assert [shape_of(g) for g in inner] == [alone]
    # The outer graph: the inner GraphModule (not a submodule) as one call, the child, the sum.
    calls = [target for op, target in shape_of(graph) if op in ("call_module", "call_function")]
    assert calls == ["uninstalled_module", "child", "add"]


def test_another_thread_traces_for_itself_during_a_session():
    alone = shape_of(trace_graph(Tied()).graph)
    seen: list[list[tuple[str, str]]] = []
    with trace_session():
        worker = threading.Thread(target=lambda: seen.append(shape_of(trace_graph(Tied()).graph)))
        worker.start()
        worker.join()
        assert shape_of(trace_graph(Tied()).graph) == alone
    assert seen == [alone]


class OwnGetattr(nn.Module):
    """A class with a ``__getattr__`` of its own (fx's patching of nn.Module's goes through it)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)

    def __getattr__(self, name: str):
        return super().__getattr__(name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x)


def test_a_session_over_a_model_patches_its_classes_only_and_reads_the_same_graphs(
    class_patches,
):
    """Given the model, a session leaves nn.Module's dunders alone (assigning them walks every
    subclass in the process): calls are routed at ``_call_impl``, ``__getattr__`` is assigned on
    the model's classes. The graphs are those read outside a session; fx patches nothing; a
    plain fx trace inside the retrofit one and another thread's trace still patch for themselves;
    everything is as it was afterwards."""
    from retrofit.capture import patching

    x = torch.randn(2, 3, 11, 11)
    call = Call((x,), {})
    own = dict(nn.Module.__dict__)
    for model in (Sizes(), Tied()):
        # Sizes branches on a child's output shape: specialised traces, which run it for real.
        extra = {"call": call} if isinstance(model, Sizes) else {}
        kinds = [extra, {"shallow": True, **extra}]
        outside = [shape_of(trace_graph(model, **kind).graph) for kind in kinds]
        patched = len(class_patches)
        with trace_session(model):
            assert nn.Module.__dict__["__call__"] is own["__call__"]
            assert nn.Module.__dict__["__getattr__"] is own["__getattr__"]
            assert nn.Module.__dict__["_call_impl"] is patching._call_impl
            assert type(model).__dict__["__getattr__"] is patching._class_getattr
            inside = [shape_of(trace_graph(model, **kind).graph) for kind in kinds]
        assert inside == outside
        assert len(class_patches) == patched  # fx patched nothing in the session
        assert "__getattr__" not in type(model).__dict__
    assert {k: nn.Module.__dict__[k] for k in own} == own
    assert not hasattr(own["__call__"], "__fx_already_patched")

    alone = shape_of(fx.symbolic_trace(Tied()).graph)
    inner: list[fx.Graph] = []
    outer = TracesInside(inner)
    seen: list[list[tuple[str, str]]] = []
    with trace_session(outer):
        graph = trace_graph(outer, shallow=True).graph
        worker = threading.Thread(target=lambda: seen.append(shape_of(trace_graph(Tied()).graph)))
        worker.start()
        worker.join()
    assert [shape_of(g) for g in inner] == [alone] and seen == [shape_of(trace_graph(Tied()).graph)]
    calls = [target for op, target in shape_of(graph) if op in ("call_module", "call_function")]
    assert calls == ["uninstalled_module", "child", "add"]


def test_a_model_class_with_its_own_getattr_gets_nn_module_patched():
    """fx's patching of nn.Module's ``__getattr__`` runs under a class's own; assigning over
    that class's would skip it, so such a model's session patches nn.Module, as without one."""
    from retrofit.capture import patching

    assert patching._model_classes(OwnGetattr()) is None
    assert sorted(c.__name__ for c in patching._model_classes(Tied())) == ["Linear", "Tied"]
    model = OwnGetattr()
    outside = shape_of(trace_graph(model).graph)
    with trace_session(model):
        assert nn.Module.__dict__["__getattr__"] is patching._DISPATCHERS["__getattr__"]
        assert nn.Module.__dict__["_call_impl"] is patching._CALL_IMPL
        inside = shape_of(trace_graph(model).graph)
    assert inside == outside == [("placeholder", "x"), ("call_module", "a"), ("output", "output")]


# --- rewritten forwards: one compilation per generated source (rewrite/execute.py) -------------


def test_blocks_with_the_same_code_compile_it_once_and_keep_their_own_names():
    from retrofit.rewrite import execute
    from tests.wild_models import DropConnectEfficientNet

    model = DropConnectEfficientNet().eval()
    x = torch.randn(2, 3, 32, 32)
    reference = model(x)
    execute._compiled.cache_clear()
    retrofit.apply(model, {"stochastic_depth": {"p_L": 0.5, "mode": "batch"}}, example_input=x)
    info = execute._compiled.cache_info()
    # Blocks 0, 2 and 3 (the sites), each one forward with an outlined branch, for training
    # and for verification's eval forward alike: two sources, six functions.
    assert (info.misses, info.hits) == (2, 4)
    torch.testing.assert_close(model(x), reference)
    fns = [model.blocks[i].__dict__["forward"].specialised[0].fn for i in (0, 2, 3)]
    names = [fn.__code__.co_filename for fn in fns]
    assert [n.split(" ")[2] for n in names] == ["blocks.0", "blocks.2", "blocks.3"]
    # A traceback through a generated forward shows its line, under its own owner's name.
    lines = [
        linecache.getline(n, fn.__code__.co_firstlineno) for n, fn in zip(names, fns, strict=True)
    ]
    assert all(line.startswith("def forward(self, inputs") for line in lines)


def test_blocks_with_the_same_code_share_one_specialisation_with_their_own_branches():
    """Blocks 0, 2 and 3 have one graph and one edit: the first is edited and generated, the
    others reuse its code with their own outlined branch bound in. Each block's training
    forward is its own: with every branch kept it is the original's."""
    import copy

    from retrofit.rewrite import execute
    from tests.wild_models import DropConnectEfficientNet

    torch.manual_seed(0)
    model = DropConnectEfficientNet().eval()
    original = copy.deepcopy(model)
    x = torch.randn(2, 3, 32, 32)
    execute.clear_caches()
    retrofit.apply(model, {"stochastic_depth": {"p_L": 0.5, "mode": "batch"}}, example_input=x)
    # One specialisation, made once: the training code serves verification's eval forward too.
    assert len(execute._TEMPLATES) == 1
    for i in (0, 2, 3):
        ((fn, mode),) = [
            (s.fn, s.training) for s in model.blocks[i].__dict__["forward"].specialised
        ]
        assert mode is None  # both modes
        bound = [v() for k, v in fn.__globals__.items() if "retrofit_constant" in k and callable(v)]
        branches = [b for b in bound if hasattr(b, "__self__")]
        assert [b.__self__ for b in branches] == [model.blocks[i]]
    gates = [m for m in model.modules() if type(m).__name__ == "StochasticDepthGate"]
    assert len(gates) == 3 and all(g.outlined for g in gates)
    for g in gates:
        g.survival = 1.0
    model.train(), original.train()
    torch.testing.assert_close(model(x), original(x))
