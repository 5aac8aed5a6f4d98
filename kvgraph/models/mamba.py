"""mamba (Mamba-1, Falcon-Mamba): no attention; each layer is RMSNorm then the Mamba mixer (conv window and
selective-scan state carried per sequence in a recurrent memory), with a residual; output tied to the
embedding when the file has no output.weight."""
from __future__ import annotations

from ..gguf.config import MetadataView
from ..graph.ir import GraphBuilder
from .base import BuildIO, Model
from .layers import mamba_mixer, mamba_sizes, mamba_state, mamba_tensors, output_tensors, rms_norm


class MambaModel(Model):
    arch = "mamba"
    optional_tensors = frozenset({"output.weight"})

    @classmethod
    def read_extra(cls, m: MetadataView):
        return mamba_sizes(m) | {"dt_b_c_rms": m.flag("ssm.dt_b_c_rms", False)}

    def tensor_shapes(self):
        c = self.cfg
        shapes = output_tensors(c)
        for i in range(c.n_layer):
            shapes |= {f"blk.{i}.attn_norm.weight": (c.n_embd,)} | mamba_tensors(c, i)[0]
        return shapes

    def derived_tensors(self):
        return {k: v for i in range(self.cfg.n_layer) for k, v in mamba_tensors(self.cfg, i)[1].items()}

    def create_memories(self, n_ctx, n_ubatch, alloc, flash_attn, n_seq_max):
        return {"rs": mamba_state(self.cfg, range(self.cfg.n_layer), alloc, n_seq_max)}

    def build(self, g: GraphBuilder, io: BuildIO) -> None:
        c = self.cfg
        w = lambda name: g.weight(name, self.shapes[name])  # noqa: E731
        x = g.get_rows(w("token_embd.weight"), io.tokens)
        for i in range(c.n_layer):
            y = mamba_mixer(g, w, io, c, i, rms_norm(g, x, w(f"blk.{i}.attn_norm.weight"), c.rms_eps),
                            c.extra["dt_b_c_rms"])
            if i == c.n_layer - 1:
                y, x = io.select_outputs(y), io.select_outputs(x)
            x = g.add(x, y)
        g.output("logits", g.matmul(rms_norm(g, x, w("output_norm.weight"), c.rms_eps), w("output.weight")))
