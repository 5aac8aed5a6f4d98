"""phi3 (Phi-3, Phi-3.5 mini): the llama block with NEOX RoPE, whose file fuses q/k/v into attn_qkv and
gate/up into ffn_up; the loader presents the parts as row ranges (views), and the compilers stack them
again where that is faster."""
from __future__ import annotations

from ..graph.ir import GraphBuilder
from .base import BuildIO, Model
from .layers import decoder, decoder_tensors, kv_memory, self_attention


class Phi3Model(Model):
    arch = "phi3"
    optional_tensors = frozenset({"output.weight"})

    def tensor_shapes(self):
        return decoder_tensors(self.cfg)

    def derived_tensors(self):
        c = self.cfg
        q, kv = c.n_head * c.head_dim_k, c.n_head_kv * c.head_dim_k
        out = {}
        for i in range(c.n_layer):
            qkv, up = f"blk.{i}.attn_qkv.weight", f"blk.{i}.ffn_up.weight"
            out |= {f"blk.{i}.attn_q.weight": (qkv, 0, q), f"blk.{i}.attn_k.weight": (qkv, q, kv),
                    f"blk.{i}.attn_v.weight": (qkv, q + kv, c.n_head_kv * c.head_dim_v),
                    f"blk.{i}.ffn_gate.weight": (up, 0, c.n_ff), f"blk.{i}.ffn_up.weight": (up, c.n_ff, c.n_ff)}
        return out

    def create_memories(self, n_ctx, n_ubatch, alloc, flash_attn, n_seq_max):
        return kv_memory(self.cfg, n_ctx, alloc, flash_attn)

    def build(self, g: GraphBuilder, io: BuildIO) -> None:
        c = self.cfg
        w = lambda name: g.weight(name, self.shapes[name])  # noqa: E731
        decoder(g, w, io, c, lambda i, h: self_attention(g, w, io, c, i, h, neox=True))
