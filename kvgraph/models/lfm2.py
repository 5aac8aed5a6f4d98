"""lfm2 (LFM2): gated short-convolution layers and attention layers (per-head q/k norm, NEOX RoPE), the
pattern from the per-layer head_count_kv (0: convolution); SwiGLU FFN; the final norm is stored as
token_embd_norm; output tied to the embedding."""
from __future__ import annotations

from ..gguf.config import MetadataView
from ..graph.ir import GraphBuilder
from .base import BuildIO, Model
from .layers import (attention_layers, decoder, hybrid_derived, hybrid_memories, hybrid_tensors, self_attention,
                     shortconv_block, shortconv_state, shortconv_tensors)


class Lfm2Model(Model):
    arch = "lfm2"
    optional_tensors = frozenset({"output.weight"})

    @classmethod
    def read_extra(cls, m: MetadataView):
        return {"attention_layers": attention_layers(m),
                "conv_cache": m.int("shortconv.l_cache", required=True, minimum=2)}

    def tensor_shapes(self):
        c = self.cfg
        base = {"token_embd.weight": (c.n_vocab, c.n_embd), "token_embd_norm.weight": (c.n_embd,),
                "output.weight": (c.n_vocab, c.n_embd)}
        return hybrid_tensors(c, base, lambda i: shortconv_tensors(c, i)[0], qk_norm=True)

    def derived_tensors(self):
        return hybrid_derived(self.cfg, shortconv_tensors)

    def create_memories(self, n_ctx, n_ubatch, alloc, flash_attn, n_seq_max):
        return hybrid_memories(self.cfg, shortconv_state, n_ctx, alloc, flash_attn, n_seq_max)

    def build(self, g: GraphBuilder, io: BuildIO) -> None:
        c, e = self.cfg, self.cfg.extra
        w = lambda name: g.weight(name, self.shapes[name])  # noqa: E731

        def mixer(i, h):
            if i in e["attention_layers"]:
                return g.matmul(self_attention(g, w, io, c, i, h, neox=True, qk_norm=True),
                                w(f"blk.{i}.attn_output.weight"))
            return shortconv_block(g, w, io, c, i, h)
        decoder(g, w, io, c, mixer, project=False, output_norm="token_embd_norm.weight")
