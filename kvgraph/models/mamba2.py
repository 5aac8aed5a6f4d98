"""mamba2 (Mamba-2): no attention; each layer is RMSNorm then the Mamba-2 mixer (multi-head scan with a
scalar decay per head, B/C per group, grouped gated RMSNorm), states carried per sequence, with a residual."""
from __future__ import annotations

from ..gguf.config import MetadataView
from ..graph.ir import GraphBuilder
from .base import BuildIO, Model
from .layers import (mamba2_channels, mamba2_mixer, mamba2_tensors, mamba_sizes, mamba_state, output_tensors,
                     rms_norm)


class Mamba2Model(Model):
    arch = "mamba2"
    optional_tensors = frozenset({"output.weight"})

    @classmethod
    def read_extra(cls, m: MetadataView):
        return mamba_sizes(m)

    def tensor_shapes(self):
        c = self.cfg
        shapes = output_tensors(c)
        for i in range(c.n_layer):
            shapes |= {f"blk.{i}.attn_norm.weight": (c.n_embd,)} | mamba2_tensors(c, i)[0]
        return shapes

    def derived_tensors(self):
        return {k: v for i in range(self.cfg.n_layer) for k, v in mamba2_tensors(self.cfg, i)[1].items()}

    def create_memories(self, n_ctx, n_ubatch, alloc, flash_attn, n_seq_max):
        return {"rs": mamba_state(self.cfg, range(self.cfg.n_layer), alloc, n_seq_max, mamba2_channels(self.cfg))}

    def build(self, g: GraphBuilder, io: BuildIO) -> None:
        c = self.cfg
        w = lambda name: g.weight(name, self.shapes[name])  # noqa: E731
        x = g.get_rows(w("token_embd.weight"), io.tokens)
        for i in range(c.n_layer):
            y = mamba2_mixer(g, w, io, c, i, rms_norm(g, x, w(f"blk.{i}.attn_norm.weight"), c.rms_eps))
            if i == c.n_layer - 1:
                y, x = io.select_outputs(y), io.select_outputs(x)
            x = g.add(x, y)
        g.output("logits", g.matmul(rms_norm(g, x, w("output_norm.weight"), c.rms_eps), w("output.weight")))
