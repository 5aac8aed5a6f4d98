"""llama (SmolLM2, Llama 3, Mistral): RMSNorm, NORM RoPE (adjacent pairs, as GGUF's permuted Q/K expect)
with llama3 frequency factors when the file has rope_freqs.weight, GQA, SwiGLU, output tied to the token
embedding when the file has no output.weight."""
from __future__ import annotations

from ..graph.ir import GraphBuilder
from .base import BuildIO, Model
from .layers import decoder, decoder_tensors, kv_memory, self_attention


class LlamaModel(Model):
    arch = "llama"
    # Tied output: without output.weight the loader binds token_embd.weight in its place.
    optional_tensors = frozenset({"output.weight"})

    def tensor_shapes(self):
        return decoder_tensors(self.cfg)

    def constant_shapes(self):
        return {"rope_freqs.weight": (self.cfg.rope_dims // 2,)}

    def create_memories(self, n_ctx, n_ubatch, alloc, flash_attn, n_seq_max):
        return kv_memory(self.cfg, n_ctx, alloc, flash_attn)

    def build(self, g: GraphBuilder, io: BuildIO) -> None:
        c = self.cfg
        w = lambda name: g.weight(name, self.shapes[name])  # noqa: E731
        factors = c.extra.get("rope_freqs.weight")
        decoder(g, w, io, c, lambda i, h: self_attention(g, w, io, c, i, h, neox=False, freq_factors=factors))
