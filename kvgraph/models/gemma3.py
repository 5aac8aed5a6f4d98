"""gemma3 (iSWA): embeddings scaled by sqrt(n_embd), RMSNorm weights as stored, QK-norm, NEOX RoPE with a
separate base for sliding-window layers, post-attention and post-FFN norms, GELU-tanh gated FFN, output
tied to the embedding. Sliding-window layers read a window-sized KV cache ("kv_swa"), global layers a
full one ("kv"); both are ordinary KV memories with their own write indices and masks."""
from __future__ import annotations

import math

from ..errors import UnsupportedModelError
from ..gguf.config import MetadataView
from ..graph.ir import GraphBuilder
from .base import BuildIO, Model
from .layers import attention, gated_ffn, split_heads, swa_memories, swa_pattern

DEFAULT_SWA_PATTERN = 6   # llama.cpp's gemma3 default: every 6th layer is global


class Gemma3Model(Model):
    arch = "gemma3"
    optional_tensors = frozenset({"output.weight"})

    @classmethod
    def read_extra(cls, m: MetadataView):
        if m.softcap("final_logit_softcapping") or m.softcap("attn_logit_softcapping"):
            raise UnsupportedModelError(f"{m.source}: logit soft-capping (Gemma 2 style) is not supported.")
        return {"sliding_window": m.int("attention.sliding_window", required=True),
                "swa_layers": swa_pattern(m, DEFAULT_SWA_PATTERN), "attention_scale": m.float("attention.scale")}

    def tensor_shapes(self):
        c = self.cfg
        hd = c.head_dim_k
        shapes = {"token_embd.weight": (c.n_vocab, c.n_embd), "output_norm.weight": (c.n_embd,),
                  "output.weight": (c.n_vocab, c.n_embd)}
        for i in range(c.n_layer):
            shapes |= {
                f"blk.{i}.attn_norm.weight": (c.n_embd,),
                f"blk.{i}.attn_q.weight": (c.n_head * hd, c.n_embd),
                f"blk.{i}.attn_k.weight": (c.n_head_kv * hd, c.n_embd),
                f"blk.{i}.attn_v.weight": (c.n_head_kv * c.head_dim_v, c.n_embd),
                f"blk.{i}.attn_q_norm.weight": (hd,),
                f"blk.{i}.attn_k_norm.weight": (hd,),
                f"blk.{i}.attn_output.weight": (c.n_embd, c.n_head * c.head_dim_v),
                f"blk.{i}.post_attention_norm.weight": (c.n_embd,),
                f"blk.{i}.ffn_norm.weight": (c.n_embd,),
                f"blk.{i}.ffn_gate.weight": (c.n_ff, c.n_embd),
                f"blk.{i}.ffn_up.weight": (c.n_ff, c.n_embd),
                f"blk.{i}.ffn_down.weight": (c.n_embd, c.n_ff),
                f"blk.{i}.post_ffw_norm.weight": (c.n_embd,),
            }
        return shapes

    @property
    def swa_layers(self) -> tuple[bool, ...]:
        return self.cfg.extra["swa_layers"]

    def create_memories(self, n_ctx, n_ubatch, alloc, flash_attn, n_seq_max):
        return swa_memories(self.cfg, self.swa_layers, self.cfg.extra["sliding_window"], n_ctx, n_ubatch, alloc,
                            flash_attn, n_seq_max)

    def build(self, g: GraphBuilder, io: BuildIO) -> None:
        c, e = self.cfg, self.cfg.extra
        w = lambda name: g.weight(name, self.shapes[name])  # noqa: E731
        scale = e["attention_scale"] or 1.0 / math.sqrt(c.head_dim_k)
        x = g.scale(g.get_rows(w("token_embd.weight"), io.tokens), math.sqrt(c.n_embd))
        for i in range(c.n_layer):
            local = self.swa_layers[i]
            base = c.rope_base_swa if local else c.rope_base
            freq_scale = 1.0 if local else c.rope_freq_scale
            h = g.mul(g.rms_norm(x, c.rms_eps), w(f"blk.{i}.attn_norm.weight"))
            q = split_heads(g, g.matmul(h, w(f"blk.{i}.attn_q.weight")), c.n_head)
            k = split_heads(g, g.matmul(h, w(f"blk.{i}.attn_k.weight")), c.n_head_kv)
            v = split_heads(g, g.matmul(h, w(f"blk.{i}.attn_v.weight")), c.n_head_kv)
            q = g.mul(g.rms_norm(q, c.rms_eps), w(f"blk.{i}.attn_q_norm.weight"))
            k = g.mul(g.rms_norm(k, c.rms_eps), w(f"blk.{i}.attn_k_norm.weight"))
            q = g.rope(q, io.pos, c.rope_dims, base, neox=True, freq_scale=freq_scale)
            k = g.rope(k, io.pos, c.rope_dims, base, neox=True, freq_scale=freq_scale)
            a = attention(g, io.memory("kv_swa" if local else "kv"), i, q, k, v, scale, io.key.flash_attn)
            if i == c.n_layer - 1:
                a, x = io.select_outputs(a), io.select_outputs(x)
            a = g.matmul(a, w(f"blk.{i}.attn_output.weight"))
            x = g.add(x, g.mul(g.rms_norm(a, c.rms_eps), w(f"blk.{i}.post_attention_norm.weight")))
            h = g.mul(g.rms_norm(x, c.rms_eps), w(f"blk.{i}.ffn_norm.weight"))
            ff = gated_ffn(g, w, i, h, act="geglu")
            x = g.add(x, g.mul(g.rms_norm(ff, c.rms_eps), w(f"blk.{i}.post_ffw_norm.weight")))
        x = g.mul(g.rms_norm(x, c.rms_eps), w("output_norm.weight"))
        g.output("logits", g.matmul(x, w("output.weight")))
