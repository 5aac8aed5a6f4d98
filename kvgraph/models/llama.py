"""llama (SmolLM2): RMSNorm, NORM RoPE (adjacent pairs, as GGUF's permuted Q/K expect), GQA, SwiGLU,
output tied to the token embedding when the file has no output.weight."""
from __future__ import annotations

import math

from ..graph.ir import GraphBuilder
from ..memory.kv_cache import KVCache
from .base import BuildIO, Model
from .layers import attention, split_heads


class LlamaModel(Model):
    arch = "llama"
    # Tied output: without output.weight the loader binds token_embd.weight in its place.
    optional_tensors = frozenset({"output.weight"})

    def tensor_shapes(self):
        c = self.cfg
        q, kv = c.n_head * c.head_dim_k, c.n_head_kv * c.head_dim_k
        shapes = {"token_embd.weight": (c.n_vocab, c.n_embd), "output_norm.weight": (c.n_embd,),
                  "output.weight": (c.n_vocab, c.n_embd)}
        for i in range(c.n_layer):
            shapes |= {
                f"blk.{i}.attn_norm.weight": (c.n_embd,),
                f"blk.{i}.attn_q.weight": (q, c.n_embd),
                f"blk.{i}.attn_k.weight": (kv, c.n_embd),
                f"blk.{i}.attn_v.weight": (c.n_head_kv * c.head_dim_v, c.n_embd),
                f"blk.{i}.attn_output.weight": (c.n_embd, c.n_head * c.head_dim_v),
                f"blk.{i}.ffn_norm.weight": (c.n_embd,),
                f"blk.{i}.ffn_gate.weight": (c.n_ff, c.n_embd),
                f"blk.{i}.ffn_up.weight": (c.n_ff, c.n_embd),
                f"blk.{i}.ffn_down.weight": (c.n_embd, c.n_ff),
            }
        return shapes

    def create_memories(self, n_ctx, n_ubatch, alloc, flash_attn):
        c = self.cfg
        return {"kv": KVCache("kv", range(c.n_layer), n_ctx, c.n_head_kv, c.head_dim_k, c.head_dim_v,
                              v_trans=not flash_attn, alloc=alloc)}

    def build(self, g: GraphBuilder, io: BuildIO) -> None:
        c = self.cfg
        w = lambda name: g.weight(name, self.shapes[name])  # noqa: E731
        attn_io = io.memory("kv")
        x = g.get_rows(w("token_embd.weight"), io.tokens)
        for i in range(c.n_layer):
            h = g.mul(g.rms_norm(x, c.rms_eps), w(f"blk.{i}.attn_norm.weight"))
            q = split_heads(g, g.matmul(h, w(f"blk.{i}.attn_q.weight")), c.n_head)
            k = split_heads(g, g.matmul(h, w(f"blk.{i}.attn_k.weight")), c.n_head_kv)
            v = split_heads(g, g.matmul(h, w(f"blk.{i}.attn_v.weight")), c.n_head_kv)
            q = g.rope(q, io.pos, c.rope_dims, c.rope_base, neox=False, freq_scale=c.rope_freq_scale)
            k = g.rope(k, io.pos, c.rope_dims, c.rope_base, neox=False, freq_scale=c.rope_freq_scale)
            a = attention(g, attn_io, i, q, k, v, 1.0 / math.sqrt(c.head_dim_k), io.key.flash_attn)
            if i == c.n_layer - 1:
                # Only output rows matter after the last attention: skip the FFN for the other rows.
                a, x = io.select_outputs(a), io.select_outputs(x)
            x = g.add(x, g.matmul(a, w(f"blk.{i}.attn_output.weight")))
            h = g.mul(g.rms_norm(x, c.rms_eps), w(f"blk.{i}.ffn_norm.weight"))
            ff = g.swiglu(g.matmul(h, w(f"blk.{i}.ffn_gate.weight")), g.matmul(h, w(f"blk.{i}.ffn_up.weight")))
            x = g.add(x, g.matmul(ff, w(f"blk.{i}.ffn_down.weight")))
        x = g.mul(g.rms_norm(x, c.rms_eps), w("output_norm.weight"))
        g.output("logits", g.matmul(x, w("output.weight")))
