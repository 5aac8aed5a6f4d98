"""Generality of the graph cache, proven on `kvgraph-hybrid`: attention layers mixed with Mamba-like
recurrent layers (per-layer conv + SSM state), layers without attention, a state tensor written twice per
step, and a state kind the cache code knows nothing about. Outputs equal an independent step-by-step
implementation, with the cache on and off."""
from __future__ import annotations

import numpy as np
import pytest

from kvgraph.backends import get_backend
from kvgraph.engine.context import Context
from kvgraph.engine.loader import load_model
from kvgraph.graph.inputs import UBatch
from tiny_models import HybridSpec, write_tiny_hybrid


class StepByStepHybrid:
    """Processes one token at a time with explicit per-layer state, float64, no graph."""

    def __init__(self, t: dict, spec: HybridSpec):
        self.t = {k: v.astype(np.float64) for k, v in t.items()}
        self.spec = spec
        self.k_cache = {i: [] for i in spec.attention_layers}
        self.v_cache = {i: [] for i in spec.attention_layers}
        self.conv = {i: np.zeros((spec.d_conv - 1, spec.d_inner)) for i in range(spec.n_layer)}
        self.h = {i: np.zeros((spec.d_inner, spec.d_state)) for i in range(spec.n_layer)}
        self.pos = 0

    def norm(self, x, w):
        return x / np.sqrt((x * x).mean() + self.spec.rms_eps) * w

    def rope(self, x):  # x [heads, hd], adjacent pairs
        hd = x.shape[-1]
        theta = self.pos * self.spec.rope_base ** (-np.arange(0, hd, 2) / hd)
        z = (x[:, 0::2] + 1j * x[:, 1::2]) * np.exp(1j * theta)
        out = np.empty_like(x)
        out[:, 0::2], out[:, 1::2] = z.real, z.imag
        return out

    def attend(self, i, h):
        sp, T = self.spec, self.t
        hd = sp.n_embd // sp.n_head
        q = self.rope((T[f"blk.{i}.attn_q.weight"] @ h).reshape(sp.n_head, hd))
        self.k_cache[i].append(self.rope((T[f"blk.{i}.attn_k.weight"] @ h).reshape(sp.n_head_kv, hd)))
        self.v_cache[i].append((T[f"blk.{i}.attn_v.weight"] @ h).reshape(sp.n_head_kv, hd))
        K, V = np.stack(self.k_cache[i]), np.stack(self.v_cache[i])
        out = []
        for hh in range(sp.n_head):
            kv = hh // (sp.n_head // sp.n_head_kv)
            s = K[:, kv] @ q[hh] / np.sqrt(hd)
            p = np.exp(s - s.max())
            out.append((p / p.sum()) @ V[:, kv])
        return T[f"blk.{i}.attn_output.weight"] @ np.concatenate(out)

    def recur(self, i, h):
        T = self.t
        silu = lambda v: v / (1 + np.exp(-v))  # noqa: E731
        xin = T[f"blk.{i}.ssm_in_x.weight"] @ h
        window = np.vstack([self.conv[i], xin])                     # [k, d]
        self.conv[i] = window[1:]
        xc = silu((window * T[f"blk.{i}.ssm_conv1d.weight"].T).sum(0))
        dt = np.log1p(np.exp(T[f"blk.{i}.ssm_dt.weight"] @ xc + T[f"blk.{i}.ssm_dt.bias"]))
        b, c = T[f"blk.{i}.ssm_b.weight"] @ xc, T[f"blk.{i}.ssm_c.weight"] @ xc
        self.h[i] = np.exp(dt[:, None] * T[f"blk.{i}.ssm_a"]) * self.h[i] + (dt * xc)[:, None] * b[None, :]
        y = self.h[i] @ c + T[f"blk.{i}.ssm_d"] * xc
        return T[f"blk.{i}.ssm_out.weight"] @ (y * silu(T[f"blk.{i}.ssm_in_z.weight"] @ h))

    def step(self, token: int) -> np.ndarray:
        sp, T = self.spec, self.t
        x = T["token_embd.weight"][token]
        for i in range(sp.n_layer):
            h = self.norm(x, T[f"blk.{i}.attn_norm.weight"])
            x = x + (self.attend(i, h) if i in sp.attention_layers else self.recur(i, h))
            h = self.norm(x, T[f"blk.{i}.ffn_norm.weight"])
            g, u = T[f"blk.{i}.ffn_gate.weight"] @ h, T[f"blk.{i}.ffn_up.weight"] @ h
            x = x + T[f"blk.{i}.ffn_down.weight"] @ (g / (1 + np.exp(-g)) * u)
        self.pos += 1
        return self.norm(x, T["output_norm.weight"]) @ T["token_embd.weight"].T


TOKENS = [12, 200, 7, 99, 31, 150, 2, 64, 180, 5, 77]
N_PROMPT = 6


@pytest.fixture(scope="module")
def hybrid(tmp_path_factory):
    spec = HybridSpec()
    path = tmp_path_factory.mktemp("hybrid") / "hybrid.gguf"
    return path, write_tiny_hybrid(path, spec), spec


def reference_logits(tensors, spec):
    ref = StepByStepHybrid(tensors, spec)
    rows = [ref.step(t) for t in TOKENS]
    return np.stack(rows[N_PROMPT - 1:])


def engine_logits(path, graph_cache=True, n_ubatch=512, flash_attn=False):
    ctx = Context(load_model(path, get_backend("numpy")), n_ctx=64, n_ubatch=n_ubatch, graph_cache=graph_cache,
                  flash_attn=flash_attn)
    for start in range(0, N_PROMPT, n_ubatch):
        last = ctx.decode(UBatch.single(TOKENS[start:min(start + n_ubatch, N_PROMPT)], start))
    rows = [last[0]]
    for p in range(N_PROMPT, len(TOKENS)):
        rows.append(ctx.decode(UBatch.single([TOKENS[p]], p))[0])
    return np.stack(rows), ctx


@pytest.mark.parametrize("n_ubatch", [512, 4, 1])
def test_hybrid_equals_step_by_step_reference(hybrid, n_ubatch):
    path, tensors, spec = hybrid
    got, _ = engine_logits(path, n_ubatch=n_ubatch)
    np.testing.assert_allclose(got, reference_logits(tensors, spec), rtol=0, atol=2e-4)


def test_hybrid_cache_on_off_bit_identical_and_hits(hybrid):
    path, _, _ = hybrid
    on, ctx_on = engine_logits(path, graph_cache=True)
    off, ctx_off = engine_logits(path, graph_cache=False)
    assert np.array_equal(on, off)
    assert ctx_on.stats.hits == len(TOKENS) - N_PROMPT - 1 and ctx_on.stats.misses == 2
    assert ctx_off.stats.hits == 0


def test_hybrid_flash_attention_layout_gives_the_same_logits(hybrid):
    path, _, _ = hybrid
    a, _ = engine_logits(path, flash_attn=False)
    b, _ = engine_logits(path, flash_attn=True)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


def test_graph_shape_of_the_hybrid(hybrid):
    """Layers without attention have no KV; each recurrent state is written twice per step."""
    path, _, spec = hybrid
    _, ctx = engine_logits(path)
    assert set(ctx.memories) == {"kv", "rs"}
    assert ctx.memories["kv"].layers == spec.attention_layers
    recurrent = [i for i in range(spec.n_layer) if i not in spec.attention_layers]
    assert ctx.memories["rs"].layers == tuple(recurrent)
    from kvgraph.graph.ir import GraphBuilder
    from kvgraph.models.base import BuildIO

    g = GraphBuilder()
    ctx.model.build(g, BuildIO(g, next(reversed(ctx.cache.entries)), ctx.memories))
    graph = g.graph
    writes: dict[str, int] = {}
    for t in graph.nodes:
        if t.op == "set_rows":
            dst = t.srcs[0]
            while dst.op == "set_rows":
                dst = dst.srcs[0]
            writes[dst.name] = writes.get(dst.name, 0) + 1
    assert all(writes[f"rs.{i}"] == 2 for i in recurrent)
    assert writes["kv.k.1"] == writes["kv.v.1"] == 1


def test_recurrent_sequences_restart_from_zero_state(hybrid):
    path, tensors, spec = hybrid
    ctx = Context(load_model(path, get_backend("numpy")), n_ctx=64)
    first = ctx.decode(UBatch.single(TOKENS[:N_PROMPT], 0))
    ctx.decode(UBatch.single([3], N_PROMPT))
    assert not ctx.seq_rm(0, 2)              # a recurrent state cannot rewind
    assert ctx.seq_rm(0)                     # but a whole sequence can go
    again = ctx.decode(UBatch.single(TOKENS[:N_PROMPT], 0))
    assert np.array_equal(first, again)
