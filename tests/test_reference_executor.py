"""The engine (graph + planner + numpy Program + KV cache) equals a direct, independent implementation."""
from __future__ import annotations

import numpy as np
import pytest

from kvgraph.backends import get_backend
from kvgraph.engine.context import Context
from kvgraph.engine.loader import load_model
from kvgraph.graph.inputs import UBatch
from tiny_models import TinySpec, write_tiny_llama


def direct_llama_logits(t: dict, spec: TinySpec, tokens: list[int]) -> np.ndarray:
    """Full causal forward over all tokens, no cache, float64; RoPE as complex rotation of adjacent pairs."""
    n = len(tokens)
    hd = spec.n_embd // spec.n_head
    group = spec.n_head // spec.n_head_kv
    T = {k: v.astype(np.float64) for k, v in t.items()}
    out_w = T.get("output.weight", T["token_embd.weight"])

    def norm(x, w):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + spec.rms_eps) * w

    def rope(x):  # x [n, heads, hd]
        freqs = spec.rope_base ** (-np.arange(0, hd, 2) / hd)
        rot = np.exp(1j * np.arange(n)[:, None] * freqs[None, :])[:, None, :]
        z = (x[..., 0::2] + 1j * x[..., 1::2]) * rot
        out = np.empty_like(x)
        out[..., 0::2], out[..., 1::2] = z.real, z.imag
        return out

    x = T["token_embd.weight"][tokens]
    causal = np.triu(np.full((n, n), -np.inf), 1)
    for i in range(spec.n_layer):
        h = norm(x, T[f"blk.{i}.attn_norm.weight"])
        q = rope((h @ T[f"blk.{i}.attn_q.weight"].T).reshape(n, spec.n_head, hd))
        k = rope((h @ T[f"blk.{i}.attn_k.weight"].T).reshape(n, spec.n_head_kv, hd))
        v = (h @ T[f"blk.{i}.attn_v.weight"].T).reshape(n, spec.n_head_kv, hd)
        heads = []
        for hh in range(spec.n_head):
            kvh = hh // group
            s = q[:, hh] @ k[:, kvh].T / np.sqrt(hd) + causal
            p = np.exp(s - s.max(-1, keepdims=True))
            heads.append((p / p.sum(-1, keepdims=True)) @ v[:, kvh])
        x = x + np.concatenate(heads, -1) @ T[f"blk.{i}.attn_output.weight"].T
        h = norm(x, T[f"blk.{i}.ffn_norm.weight"])
        g, u = h @ T[f"blk.{i}.ffn_gate.weight"].T, h @ T[f"blk.{i}.ffn_up.weight"].T
        x = x + (g / (1 + np.exp(-g)) * u) @ T[f"blk.{i}.ffn_down.weight"].T
    return norm(x, T["output_norm.weight"]) @ out_w.T


def run_engine(path, tokens, n_prompt, flash_attn=False, n_ubatch=512, graph_cache=True):
    """Prompt of n_prompt tokens, then the rest one at a time; logits of every step's last token."""
    ctx = Context(load_model(path, get_backend("numpy")), n_ctx=64, n_ubatch=n_ubatch,
                  flash_attn=flash_attn, graph_cache=graph_cache)
    rows = []
    for start in range(0, n_prompt, n_ubatch):
        chunk = tokens[start:min(start + n_ubatch, n_prompt)]
        last = ctx.decode(UBatch.single(chunk, start))
    rows.append(last[0])
    for p in range(n_prompt, len(tokens)):
        rows.append(ctx.decode(UBatch.single([tokens[p]], p))[0])
    return np.stack(rows)


TOKENS = [5, 77, 140, 3, 200, 41, 9, 250, 13, 66, 100, 7]


@pytest.mark.parametrize("flash_attn", [False, True], ids=["v-transposed", "flash-attn"])
@pytest.mark.parametrize("n_ubatch", [512, 3], ids=["one-ubatch", "ubatch-3"])
def test_engine_matches_direct_implementation(tmp_path, flash_attn, n_ubatch):
    spec = TinySpec(seed=1)
    path = tmp_path / "m.gguf"
    tensors = write_tiny_llama(path, spec)
    n_prompt = 7
    got = run_engine(path, TOKENS, n_prompt, flash_attn=flash_attn, n_ubatch=n_ubatch)
    ref = direct_llama_logits(tensors, spec, TOKENS)[n_prompt - 1:]
    np.testing.assert_allclose(got, ref, rtol=0, atol=2e-4)


@pytest.mark.parametrize("weight_type", ["F16", "Q8_0", "Q4_0", "Q4_1", "Q5_0"])
def test_quantized_weights_are_dequantized_exactly(tmp_path, weight_type):
    spec = TinySpec(seed=2, weight_type=weight_type, tied_output=False)
    path = tmp_path / "m.gguf"
    tensors = write_tiny_llama(path, spec)
    got = run_engine(path, TOKENS[:6], 4)
    ref = direct_llama_logits(tensors, spec, TOKENS[:6])[3:]
    np.testing.assert_allclose(got, ref, rtol=0, atol=2e-4)
