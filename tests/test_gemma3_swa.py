"""gemma3's interleaved sliding-window attention on a tiny file with a 4-token window: the engine, with
its window-sized ring of KV cells for local layers, equals a direct full-sequence implementation with
per-layer masks — across ubatch splits, long past the window, with stable graph keys."""
from __future__ import annotations

import math

import numpy as np
import pytest

from kvgraph.backends import get_backend
from kvgraph.engine.context import Context
from kvgraph.engine.loader import load_model
from kvgraph.graph.inputs import UBatch
from kvgraph.memory.kv_cache import PAGE
from tiny_models import Gemma3Spec, write_tiny_gemma3


def direct_gemma3_logits(t: dict, spec: Gemma3Spec, tokens: list[int]) -> np.ndarray:
    T = {k: v.astype(np.float64) for k, v in t.items()}
    n, hd = len(tokens), spec.head_dim
    pos = np.arange(n)

    def norm(x, w):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + spec.rms_eps) * w

    def rope_neox(x, base):  # x [n, heads, hd]: rotate halves
        theta = pos[:, None, None] * base ** (-np.arange(0, hd, 2) / hd)
        a, b = x[..., : hd // 2], x[..., hd // 2:]
        return np.concatenate([a * np.cos(theta) - b * np.sin(theta), a * np.sin(theta) + b * np.cos(theta)], -1)

    def gelu(v):
        return 0.5 * v * (1 + np.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v ** 3)))

    x = T["token_embd.weight"][tokens] * math.sqrt(spec.n_embd)
    dist = pos[:, None] - pos[None, :]
    for i in range(spec.n_layer):
        local = i % spec.swa_pattern < spec.swa_pattern - 1
        allowed = (dist >= 0) & ((dist < spec.sliding_window) if local else True)
        base = spec.rope_base_swa if local else spec.rope_base
        h = norm(x, T[f"blk.{i}.attn_norm.weight"])
        q = norm((h @ T[f"blk.{i}.attn_q.weight"].T).reshape(n, spec.n_head, hd), T[f"blk.{i}.attn_q_norm.weight"])
        k = norm((h @ T[f"blk.{i}.attn_k.weight"].T).reshape(n, spec.n_head_kv, hd), T[f"blk.{i}.attn_k_norm.weight"])
        v = (h @ T[f"blk.{i}.attn_v.weight"].T).reshape(n, spec.n_head_kv, hd)
        q, k = rope_neox(q, base), rope_neox(k, base)
        heads = []
        for hh in range(spec.n_head):
            kv = hh // (spec.n_head // spec.n_head_kv)
            s = np.where(allowed, q[:, hh] @ k[:, kv].T / math.sqrt(hd), -np.inf)
            p = np.exp(s - s.max(-1, keepdims=True))
            heads.append((p / p.sum(-1, keepdims=True)) @ v[:, kv])
        a = np.concatenate(heads, -1) @ T[f"blk.{i}.attn_output.weight"].T
        x = x + norm(a, T[f"blk.{i}.post_attention_norm.weight"])
        h = norm(x, T[f"blk.{i}.ffn_norm.weight"])
        f = (gelu(h @ T[f"blk.{i}.ffn_gate.weight"].T) * (h @ T[f"blk.{i}.ffn_up.weight"].T)) @ T[f"blk.{i}.ffn_down.weight"].T
        x = x + norm(f, T[f"blk.{i}.post_ffw_norm.weight"])
    return norm(x, T["output_norm.weight"]) @ T["token_embd.weight"].T


TOKENS = [int(t) for t in np.random.default_rng(5).integers(3, 260, 40)]


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    spec = Gemma3Spec()
    path = tmp_path_factory.mktemp("g3") / "tiny-gemma3.gguf"
    tensors = write_tiny_gemma3(path, spec)
    return load_model(path, get_backend("numpy")), direct_gemma3_logits(tensors, spec, TOKENS), spec


@pytest.mark.parametrize("flash_attn", [False, True], ids=["v-transposed", "flash-attn"])
@pytest.mark.parametrize("n_ubatch,n_prompt", [(512, 20), (3, 20), (8, 9)])
def test_gemma3_swa_equals_direct_implementation(gemma, n_ubatch, n_prompt, flash_attn):
    loaded, ref, spec = gemma
    ctx = Context(loaded, n_ctx=64, n_ubatch=n_ubatch, flash_attn=flash_attn)
    for start in range(0, n_prompt, n_ubatch):
        last = ctx.decode(UBatch.single(TOKENS[start:min(start + n_ubatch, n_prompt)], start))
    rows = [last[0]]
    for p in range(n_prompt, len(TOKENS)):
        rows.append(ctx.decode(UBatch.single([TOKENS[p]], p))[0])
    np.testing.assert_allclose(np.stack(rows), ref[n_prompt - 1:], rtol=0, atol=2e-4)


def test_two_kv_memories_with_layer_split_and_stable_keys(gemma):
    loaded, _, spec = gemma
    ctx = Context(loaded, n_ctx=600, n_ubatch=4, n_seq_max=1)
    assert ctx.memories["kv"].layers == (1, 3) and ctx.memories["kv_swa"].layers == (0, 2)
    swa = ctx.memories["kv_swa"]
    assert swa.n_cells == 2 * PAGE   # window 4 + ubatch 4 - 1 positions: two pages where they cross a page
    ctx.decode(UBatch.single(TOKENS[:4], 0))
    keys = set()
    for p in range(4, 300):
        ub = UBatch.single([TOKENS[p % len(TOKENS)]], p)
        ctx.decode(ub)
        keys.add(ctx.key_for(ub))
        assert swa.n_used() <= spec.sliding_window + 1   # old cells are recycled
    # the full cache's window grows 256 -> 512 once; the SWA window (all of its pages) never moves
    assert {dict(k.windows)["kv_swa"] for k in keys} == {2 * PAGE}
    assert ctx.stats.misses == 3 and ctx.stats.hits == 294
