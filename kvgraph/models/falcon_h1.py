"""falcon-h1 (Falcon-H1): every layer runs attention (NEOX RoPE) and a Mamba-2 mixer side by side on the same
normed input and adds both; then a SwiGLU FFN. The per-branch multipliers are folded into the weights by
the converter. (Its files name the FFN norm 'blk.N.ffn_norm', without '.weight'.)"""
from __future__ import annotations

from ..gguf.config import MetadataView
from ..graph.ir import GraphBuilder
from .base import BuildIO, Model
from .layers import (attention_tensors, gated_ffn, kv_memory, mamba2_channels, mamba2_mixer, mamba2_tensors,
                     mamba_sizes, mamba_state, output_tensors, rms_norm, self_attention)


class FalconH1Model(Model):
    arch = "falcon-h1"
    optional_tensors = frozenset({"output.weight"})

    @classmethod
    def read_extra(cls, m: MetadataView):
        return mamba_sizes(m) | {"attention_scale": m.float("attention.scale")}

    @classmethod
    def read_layout(cls, cfg, tensor_names):
        return {"ssm_norm": "blk.0.ssm_norm.weight" in tensor_names}

    def tensor_shapes(self):
        c = self.cfg
        shapes = output_tensors(c)
        for i in range(c.n_layer):
            shapes |= attention_tensors(c, i) | mamba2_tensors(c, i, c.extra["ssm_norm"])[0] | {
                f"blk.{i}.ffn_norm": (c.n_embd,), f"blk.{i}.ffn_gate.weight": (c.n_ff, c.n_embd),
                f"blk.{i}.ffn_up.weight": (c.n_ff, c.n_embd), f"blk.{i}.ffn_down.weight": (c.n_embd, c.n_ff)}
        return shapes

    def derived_tensors(self):
        return {k: v for i in range(self.cfg.n_layer) for k, v in mamba2_tensors(self.cfg, i)[1].items()}

    def create_memories(self, n_ctx, n_ubatch, alloc, flash_attn, n_seq_max):
        c = self.cfg
        return {"rs": mamba_state(c, range(c.n_layer), alloc, n_seq_max, mamba2_channels(c))} | \
            kv_memory(c, n_ctx, alloc, flash_attn)

    def build(self, g: GraphBuilder, io: BuildIO) -> None:
        c, e = self.cfg, self.cfg.extra
        w = lambda name: g.weight(name, self.shapes[name])  # noqa: E731
        x = g.get_rows(w("token_embd.weight"), io.tokens)
        for i in range(c.n_layer):
            h = rms_norm(g, x, w(f"blk.{i}.attn_norm.weight"), c.rms_eps)
            a = g.matmul(self_attention(g, w, io, c, i, h, neox=True, scale=e["attention_scale"]),
                         w(f"blk.{i}.attn_output.weight"))
            y = g.add(a, mamba2_mixer(g, w, io, c, i, h, e["ssm_norm"]))
            if i == c.n_layer - 1:
                y, x = io.select_outputs(y), io.select_outputs(x)
            x = g.add(x, y)
            x = g.add(x, gated_ffn(g, w, i, rms_norm(g, x, w(f"blk.{i}.ffn_norm"), c.rms_eps)))
        g.output("logits", g.matmul(rms_norm(g, x, w("output_norm.weight"), c.rms_eps), w("output.weight")))
