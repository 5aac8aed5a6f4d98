"""Building blocks shared by architectures: attention over a KV window, gated FFNs, output selection."""
from __future__ import annotations

from ..graph.ir import GraphBuilder, Tensor
from ..memory.kv_cache import KVAttention


def attention(g: GraphBuilder, attn: KVAttention, il: int, q: Tensor, k: Tensor, v: Tensor, scale: float,
              flash: bool) -> Tensor:
    """Store this ubatch's K/V for layer il, attend over the KV window; q [n, H, d], k/v [n, Hkv, d].
    Returns [n, H * dv]. flash=True: one fused op over a row-major V cache; flash=False: ggml's non-flash
    path (KQ matmul, masked softmax, KQV matmul against a transposed V cache)."""
    n, n_head, d = q.shape
    n_head_kv = k.shape[1]
    group = n_head // n_head_kv
    k_win, v_win = attn.store(il, k, v)
    if flash:
        out = g.flash_attn(q, k_win, v_win, attn.mask, scale)
        return g.reshape(out, (n, n_head * out.shape[2]))
    n_kv = attn.n_kv
    dv = v_win.shape[1]
    # Heads h = kvh * group + j share kv head kvh: group the query heads so one batched matmul per kv head.
    qh = g.reshape(g.cont(g.permute(q, (1, 0, 2))), (n_head_kv, group * n, d))
    kq = g.matmul(qh, g.permute(k_win, (1, 0, 2)))                      # [Hkv, group*n, n_kv]
    kq = g.softmax(g.reshape(kq, (n_head_kv, group, n, n_kv)), attn.mask, scale)
    kqv = g.matmul(g.reshape(kq, (n_head_kv, group * n, n_kv)), v_win)  # v_win [Hkv, dv, n_kv]
    out = g.cont(g.permute(g.reshape(kqv, (n_head, n, dv)), (1, 0, 2)))
    return g.reshape(out, (n, n_head * dv))


def split_heads(g: GraphBuilder, x: Tensor, n_head: int) -> Tensor:
    n, width = x.shape
    return g.reshape(x, (n, n_head, width // n_head))
