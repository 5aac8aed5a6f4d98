"""kvgraph-hybrid: a small Jamba-like test architecture mixing attention layers with Mamba-like
recurrent layers (causal conv + selective scan), to prove the graph cache handles layers without
attention, state kinds beyond K/V, and a state tensor written twice in one step.

Metadata (prefix `kvgraph-hybrid.`): the llama keys plus `attention_layers` (indices of attention
layers; all others are recurrent), `ssm.inner_size`, `ssm.state_size`, `ssm.conv_kernel`.
A recurrent layer's state row is [conv window ((k-1) x d_inner) | ssm state (d_state x d_inner)].
"""
from __future__ import annotations

import math

from ..errors import GGUFError
from ..gguf.config import MetadataView
from ..graph.ir import GraphBuilder, Tensor
from ..memory.kv_cache import KVCache
from ..memory.recurrent import RecurrentState
from .base import BuildIO, Model
from .layers import attention, causal_conv, gated_ffn, split_heads



class HybridModel(Model):
    arch = "kvgraph-hybrid"
    optional_tensors = frozenset({"output.weight"})

    @classmethod
    def read_extra(cls, m: MetadataView):
        n_layer = m.int("block_count", required=True)
        attn = tuple(m.int_list("attention_layers", []))
        if any(not 0 <= i < n_layer for i in attn):
            raise GGUFError(f"{m.source}: attention_layers {attn} out of range for {n_layer} layers.")
        return {"attention_layers": attn, "d_inner": m.int("ssm.inner_size", required=True),
                "d_state": m.int("ssm.state_size", required=True), "d_conv": m.int("ssm.conv_kernel", required=True)}

    @property
    def attention_layers(self) -> tuple[int, ...]:
        return self.cfg.extra["attention_layers"]

    def tensor_shapes(self):
        c, e = self.cfg, self.cfg.extra
        d, s, k = e["d_inner"], e["d_state"], e["d_conv"]
        hd = c.head_dim_k
        shapes = {"token_embd.weight": (c.n_vocab, c.n_embd), "output_norm.weight": (c.n_embd,),
                  "output.weight": (c.n_vocab, c.n_embd)}
        for i in range(c.n_layer):
            shapes |= {f"blk.{i}.attn_norm.weight": (c.n_embd,), f"blk.{i}.ffn_norm.weight": (c.n_embd,),
                       f"blk.{i}.ffn_gate.weight": (c.n_ff, c.n_embd), f"blk.{i}.ffn_up.weight": (c.n_ff, c.n_embd),
                       f"blk.{i}.ffn_down.weight": (c.n_embd, c.n_ff)}
            if i in self.attention_layers:
                shapes |= {f"blk.{i}.attn_q.weight": (c.n_head * hd, c.n_embd),
                           f"blk.{i}.attn_k.weight": (c.n_head_kv * hd, c.n_embd),
                           f"blk.{i}.attn_v.weight": (c.n_head_kv * hd, c.n_embd),
                           f"blk.{i}.attn_output.weight": (c.n_embd, c.n_head * hd)}
            else:
                shapes |= {f"blk.{i}.ssm_in_x.weight": (d, c.n_embd), f"blk.{i}.ssm_in_z.weight": (d, c.n_embd),
                           f"blk.{i}.ssm_conv1d.weight": (d, k), f"blk.{i}.ssm_dt.weight": (d, d),
                           f"blk.{i}.ssm_dt.bias": (d,), f"blk.{i}.ssm_b.weight": (s, d),
                           f"blk.{i}.ssm_c.weight": (s, d), f"blk.{i}.ssm_a": (d, s), f"blk.{i}.ssm_d": (d,),
                           f"blk.{i}.ssm_out.weight": (c.n_embd, d)}
        return shapes

    def create_memories(self, n_ctx, n_ubatch, alloc, flash_attn, n_seq_max):
        c, e = self.cfg, self.cfg.extra
        recurrent = [i for i in range(c.n_layer) if i not in self.attention_layers]
        row = (e["d_conv"] - 1) * e["d_inner"] + e["d_state"] * e["d_inner"]
        mems = {}
        if self.attention_layers:
            mems["kv"] = KVCache("kv", self.attention_layers, n_ctx, c.n_head_kv, c.head_dim_k, c.head_dim_v,
                                 v_trans=not flash_attn, alloc=alloc)
        if recurrent:
            mems["rs"] = RecurrentState("rs", recurrent, n_seq_max, row, alloc)
        return mems

    def _recurrent(self, g: GraphBuilder, io: BuildIO, i: int, h: Tensor) -> Tensor:
        e = self.cfg.extra
        d, s, k = e["d_inner"], e["d_state"], e["d_conv"]
        w = lambda name: g.weight(f"blk.{i}.{name}", self.shapes[f"blk.{i}.{name}"])  # noqa: E731
        rs = io.memory("rs")
        n, n_seqs = h.shape[0], io.key.n_seqs
        t = n // n_seqs
        ssm_state = g.reshape(rs.read(i, (k - 1) * d, s * d), (n_seqs, s, d))
        xc = g.silu(causal_conv(g, rs, i, g.reshape(g.matmul(h, w("ssm_in_x.weight")), (n_seqs, t, d)),
                                w("ssm_conv1d.weight")))                        # first write: conv window
        xr = g.reshape(xc, (n, d))
        dt = g.add(g.matmul(xr, w("ssm_dt.weight")), w("ssm_dt.bias"))
        scan = g.ssm_scan(ssm_state, xc, g.reshape(dt, (n_seqs, t, d)), w("ssm_a"),
                          g.reshape(g.matmul(xr, w("ssm_b.weight")), (n_seqs, t, s)),
                          g.reshape(g.matmul(xr, w("ssm_c.weight")), (n_seqs, t, s)))
        rs.write(i, g.slice_rows(scan, t, s, axis=1), col=(k - 1) * d)           # second write: ssm state
        y = g.add(g.reshape(g.cont(g.slice_rows(scan, 0, t, axis=1)), (n, d)), g.mul(xr, w("ssm_d")))
        y = g.mul(y, g.silu(g.matmul(h, w("ssm_in_z.weight"))))
        return g.matmul(y, w("ssm_out.weight"))

    def build(self, g: GraphBuilder, io: BuildIO) -> None:
        c = self.cfg
        w = lambda name: g.weight(name, self.shapes[name])  # noqa: E731
        x = g.get_rows(w("token_embd.weight"), io.tokens)
        for i in range(c.n_layer):
            h = g.mul(g.rms_norm(x, c.rms_eps), w(f"blk.{i}.attn_norm.weight"))
            if i in self.attention_layers:
                q = split_heads(g, g.matmul(h, w(f"blk.{i}.attn_q.weight")), c.n_head)
                k = split_heads(g, g.matmul(h, w(f"blk.{i}.attn_k.weight")), c.n_head_kv)
                v = split_heads(g, g.matmul(h, w(f"blk.{i}.attn_v.weight")), c.n_head_kv)
                q = g.rope(q, io.pos, c.rope_dims, c.rope_base, neox=False)
                k = g.rope(k, io.pos, c.rope_dims, c.rope_base, neox=False)
                a = attention(g, io.memory("kv"), i, q, k, v, 1.0 / math.sqrt(c.head_dim_k), io.key.flash_attn)
                a = g.matmul(a, w(f"blk.{i}.attn_output.weight"))
            else:
                a = self._recurrent(g, io, i, h)
            if i == c.n_layer - 1:
                a, x = io.select_outputs(a), io.select_outputs(x)
            x = g.add(x, a)
            h = g.mul(g.rms_norm(x, c.rms_eps), w(f"blk.{i}.ffn_norm.weight"))
            x = g.add(x, gated_ffn(g, w, i, h))
        x = g.mul(g.rms_norm(x, c.rms_eps), w("output_norm.weight"))
        g.output("logits", g.matmul(x, w("output.weight")))
