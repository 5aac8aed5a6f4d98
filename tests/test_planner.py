"""The planner reuses buffers but never lets two live tensors share bytes."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from graph_harness import run_graph
from kvgraph.graph.ir import GraphBuilder
from kvgraph.plan.planner import INPLACE_OPS, base_of, live_nodes, plan_graph


@st.composite
def random_graphs(draw):
    """A random DAG of elementwise ops over a few widths, with views and several outputs."""
    n_inputs = draw(st.integers(1, 3))
    steps = draw(st.lists(st.tuples(st.sampled_from(["add", "mul", "silu", "scale", "reshape", "rms_norm",
                                                     "swiglu", "geglu"]),
                                    st.integers(0, 10 ** 6), st.integers(0, 10 ** 6)), min_size=1, max_size=25))
    n_out = draw(st.integers(1, 3))
    return n_inputs, steps, n_out


def build_random(g: GraphBuilder, n_inputs, steps, n_out, width=8):
    pool = [g.input(f"x{i}", (4, width)) for i in range(n_inputs)]
    for op, i, j in steps:
        a, b = pool[i % len(pool)], pool[j % len(pool)]
        if op in ("add", "mul", "swiglu", "geglu"):
            t = getattr(g, op)(a, b if b.shape == a.shape else a)
        elif op == "scale":
            t = g.scale(a, 0.5)
        elif op == "reshape":
            t = g.reshape(a, (a.shape[1], a.shape[0])) if a.shape == (4, width) else g.reshape(a, (4, width))
        elif op == "rms_norm":
            t = g.rms_norm(a, 1e-5)
        else:
            t = g.silu(a)
        pool.append(t)
    outs = pool[-n_out:]
    for k, t in enumerate(outs):
        g.output(f"y{k}", g.reshape(t, (4, width)) if t.shape != (4, width) else t)


def eval_direct(n_inputs, steps, n_out, xs, width=8):
    pool = list(xs)
    for op, i, j in steps:
        a, b = pool[i % len(pool)], pool[j % len(pool)]
        if op in ("add", "mul", "swiglu", "geglu"):
            b = b if b.shape == a.shape else a
            if op == "swiglu":
                t = a / (1 + np.exp(-a)) * b
            elif op == "geglu":
                t = np.float32(0.5) * a * (1 + np.tanh(np.float32(np.sqrt(2 / np.pi)) * (a + np.float32(0.044715) * a ** 3))) * b
            else:
                t = a + b if op == "add" else a * b
        elif op == "scale":
            t = a * np.float32(0.5)
        elif op == "reshape":
            t = a.reshape(a.shape[1], a.shape[0]) if a.shape == (4, width) else a.reshape(4, width)
        elif op == "rms_norm":
            t = a / np.sqrt((a * a).mean(-1, keepdims=True) + np.float32(1e-5))
        else:
            t = a / (1 + np.exp(-a))
        pool.append(t)
    return [t.reshape(4, width) for t in pool[-n_out:]]


@settings(max_examples=150, deadline=None)
@given(random_graphs())
def test_live_buffers_never_overlap(case):
    g = GraphBuilder()
    build_random(g, *case)
    plan = plan_graph(g.graph)
    nodes = {t.id: t for t in g.graph.nodes}
    items = list(plan.lifetimes.items())
    for n, (a, (a0, a1)) in enumerate(items):
        for b, (b0, b1) in items[n + 1:]:
            if a0 <= b1 and b0 <= a1:  # both alive at some step
                ra = (plan.offsets[a], plan.offsets[a] + plan.nbytes[a])
                rb = (plan.offsets[b], plan.offsets[b] + plan.nbytes[b])
                if ra[1] <= rb[0] or rb[1] <= ra[0]:
                    continue
                # the one exception: an elementwise op writing over a source of its own that dies at it
                (first, (_, end)), (later, (start, _)) = sorted([(a, (a0, a1)), (b, (b0, b1))], key=lambda x: x[1])
                assert ra == rb and end == start and nodes[later].op in INPLACE_OPS \
                    and any(s.id == first for s in nodes[later].srcs), f"buffers {a} and {b} overlap while both live"


@settings(max_examples=60, deadline=None)
@given(random_graphs())
def test_planned_execution_equals_direct_evaluation(case):
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((4, 8)).astype(np.float32) for _ in range(case[0])]
    out = run_graph(lambda g: build_random(g, *case), {f"x{i}": x for i, x in enumerate(xs)})
    for k, ref in enumerate(eval_direct(*case, xs)):
        np.testing.assert_allclose(out[f"y{k}"], ref, rtol=1e-5, atol=1e-5)


def _backends():
    from kvgraph.backends import get_backend, native, torch_available

    names = ["numpy"] + (["native"] if native.library() is not None else []) + (["torch"] if torch_available() else [])
    return [get_backend(n) for n in names]


@settings(max_examples=40, deadline=None)
@given(random_graphs())
def test_in_place_buffers_change_no_bit_on_any_backend(case):
    """Every backend's kernels for INPLACE_OPS give the same bits whether the output has a buffer of its own
    or writes over a dying source (37 columns: the vector kernels' scalar tails run in place too)."""
    rng = np.random.default_rng(1)
    xs = {f"x{i}": rng.standard_normal((4, 37)).astype(np.float32) for i in range(case[0])}
    g = GraphBuilder()
    build_random(g, *case, width=37)
    for backend in _backends():
        results = []
        for inplace in (True, False):
            program = backend.compile(g.graph, plan_graph(g.graph, inplace=inplace), {}, {})
            for name, value in xs.items():
                if name in program.inputs:
                    program.inputs[name][...] = value
            program.run()
            results.append({k: np.array(backend.to_numpy(v)) for k, v in program.outputs.items()})
        for k in results[0]:
            np.testing.assert_array_equal(results[0][k], results[1][k], err_msg=f"{backend.name} {k}")


def test_an_elementwise_op_writes_over_a_source_only_when_that_source_dies_there():
    g = GraphBuilder()
    x = g.input("x", (16, 64))
    gate, up = g.silu(x), g.scale(x, 2.0)
    h = g.swiglu(gate, up)                  # up dies here: h takes its range
    y = g.add(h, gate)                      # gate is read again here: h cannot take the gate's range
    g.output("y", y)
    plan = plan_graph(g.graph)
    assert plan.offsets[h.id] == plan.offsets[up.id] and plan.offsets[y.id] == plan.offsets[h.id]
    assert plan.offsets[h.id] != plan.offsets[gate.id]

    g = GraphBuilder()
    x = g.input("x", (16, 64))
    a = g.silu(x)
    v = g.reshape(a, (64, 16))
    s = g.scale(g.reshape(v, (16, 64)), 3.0)      # a read through a view: never written over
    g.output("s", s)
    g.output("a", a)
    plan = plan_graph(g.graph)
    assert plan.offsets[s.id] != plan.offsets[a.id]

    g = GraphBuilder()
    x = g.input("x", (16, 64))
    a = g.silu(x)
    g.output("a", a)                               # a graph output lives to the end
    g.output("b", g.scale(a, 3.0))
    plan = plan_graph(g.graph)
    assert len(set(plan.offsets.values())) == 2


def test_in_place_reuse_shrinks_a_feed_forward_arena():
    g = GraphBuilder()
    x = g.input("x", (512, 64))
    h = g.swiglu(g.matmul(x, g.weight("wg", (256, 64))), g.matmul(x, g.weight("wu", (256, 64))))
    g.output("y", g.add(x, g.matmul(h, g.weight("wd", (64, 256)))))
    inplace, separate = plan_graph(g.graph), plan_graph(g.graph, inplace=False)
    one = 512 * 256 * 4
    assert separate.arena_size >= 3 * one and inplace.arena_size < 3 * one


@pytest.mark.parametrize("kind", ["swiglu", "geglu"])
def test_a_glu_matmul_equals_its_parts_and_needs_no_memory_for_them(kind):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((512, 64), dtype=np.float32)
    w = {n: rng.standard_normal((256, 64), dtype=np.float32) for n in ("wg", "wu")}

    def build(g: GraphBuilder, fused: bool):
        xs, wg, wu = g.input("x", (512, 64)), g.weight("wg", (256, 64)), g.weight("wu", (256, 64))
        h = g.matmul_glu(xs, wg, wu, kind) if fused else getattr(g, kind)(g.matmul(xs, wg), g.matmul(xs, wu))
        g.output("y", h)

    np.testing.assert_array_equal(run_graph(lambda g: build(g, True), {"x": x}, w)["y"],
                                  run_graph(lambda g: build(g, False), {"x": x}, w)["y"])
    sizes = []
    for fused in (True, False):
        g = GraphBuilder()
        build(g, fused)
        sizes.append(plan_graph(g.graph).arena_size)
    assert sizes[0] == 512 * 256 * 4 < sizes[1]
    with pytest.raises(ValueError):
        GraphBuilder().matmul_glu(g.input("a", (2, 64)), g.weight("b", (8, 64)), g.weight("c", (8, 32)))


def test_chain_reuses_memory():
    g = GraphBuilder()
    x = g.input("x", (64, 64))
    for _ in range(20):
        x = g.silu(x)
    g.output("y", x)
    plan = plan_graph(g.graph)
    one = 64 * 64 * 4
    assert plan.arena_size <= 2 * one < sum(plan.nbytes.values())


def test_dead_nodes_are_pruned_but_state_writes_kept():
    from kvgraph.graph.ir import I32
    g = GraphBuilder()
    x = g.input("x", (2, 4))
    g.silu(x)  # dead
    g.set_rows(g.state("s", (8, 4)), g.scale(x, 2.0), g.input("i", (2,), I32))
    g.output("y", g.add(x, x))
    ops = [t.op for t in live_nodes(g.graph)]
    assert "silu" not in ops and "set_rows" in ops and "scale" in ops


def test_views_share_their_base_buffer():
    g = GraphBuilder()
    x = g.input("x", (2, 4))
    y = g.silu(x)
    v = g.reshape(y, (8,))
    assert base_of(v) is y


def test_matmuls_of_one_input_are_planned_together_whatever_the_statement_order():
    """q = x Wq; q2 = norm(q); k = x Wk; v = x Wv: the compilers stack x's weight matmuls into one only if
    nothing reads a member before the last runs, so the plan puts them side by side."""
    from kvgraph.graph.ir import GraphBuilder
    g = GraphBuilder()
    x = g.input("x", (3, 8))
    q = g.matmul(x, g.weight("wq", (8, 8)))
    q2 = g.rms_norm(q, 1e-5)
    k = g.matmul(x, g.weight("wk", (4, 8)))
    v = g.matmul(g.rms_norm(x, 1e-5), g.weight("wv", (4, 8)))      # another input: not a sibling
    g.output("o", g.add(g.add(q2, g.matmul(k, g.weight("wo", (8, 4)))), g.matmul(v, g.weight("wp", (8, 4)))))
    order = list(plan_graph(g.graph).order)
    assert order.index(k.id) == order.index(q.id) + 2          # q, then k's weight leaf, then k
    assert order.index(q2.id) > order.index(k.id)
    nodes = {t.id: t for t in g.graph.nodes}
    for i, tid in enumerate(order):                            # still topological
        assert all(order.index(s.id) < i for s in nodes[tid].srcs)
