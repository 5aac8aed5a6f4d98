"""qwen2 (Qwen2, Qwen2.5): the llama block with q/k/v biases and NEOX RoPE (rotated halves)."""
from __future__ import annotations

from ..graph.ir import GraphBuilder
from .base import BuildIO, Model
from .layers import decoder, decoder_tensors, kv_memory, self_attention


class Qwen2Model(Model):
    arch = "qwen2"
    optional_tensors = frozenset({"output.weight"})
    attention = {"bias": True}       # what the attention block has beyond llama's (Qwen3 differs here only)

    def tensor_shapes(self):
        return decoder_tensors(self.cfg, **self.attention)

    def create_memories(self, n_ctx, n_ubatch, alloc, flash_attn, n_seq_max):
        return kv_memory(self.cfg, n_ctx, alloc, flash_attn)

    def build(self, g: GraphBuilder, io: BuildIO) -> None:
        c = self.cfg
        w = lambda name: g.weight(name, self.shapes[name])  # noqa: E731
        decoder(g, w, io, c, lambda i, h: self_attention(g, w, io, c, i, h, neox=True, **self.attention))
