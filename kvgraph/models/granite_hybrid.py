"""granitehybrid (Granite 4.0 hybrid): Mamba-2 layers and attention layers (no positional encoding unless
rope.scaling.finetuned says otherwise), the pattern from the per-layer head_count_kv (0: Mamba), Granite's
scales (embedding, residual, attention, logits), SwiGLU FFN (or experts, as the tensors say)."""
from __future__ import annotations

from ..gguf.config import MetadataView
from ..graph.ir import GraphBuilder
from .base import BuildIO, Model
from .layers import (attention_layers, ffn_or_moe, ffn_or_moe_tensors, hybrid_derived, hybrid_memories,
                     hybrid_tensors, mamba2_channels, mamba2_mixer, mamba2_tensors, mamba_sizes, mamba_state,
                     moe_layout, moe_sizes, output_tensors, rms_norm, self_attention)


class GraniteHybridModel(Model):
    arch = "granitehybrid"
    optional_tensors = frozenset({"output.weight"})

    @classmethod
    def read_extra(cls, m: MetadataView):
        return mamba_sizes(m) | moe_sizes(m) | {
            "attention_layers": attention_layers(m),
            "rope": m.flag("rope.scaling.finetuned", True),   # llama.cpp's switch for RoPE
            "embedding_scale": m.float("embedding_scale"), "residual_scale": m.float("residual_scale"),
            "attention_scale": m.float("attention.scale"), "logit_scale": m.float("logit_scale")}

    @classmethod
    def read_layout(cls, cfg, tensor_names):
        return moe_layout(cfg, tensor_names)

    def tensor_shapes(self):
        c = self.cfg
        return hybrid_tensors(c, output_tensors(c), lambda i: mamba2_tensors(c, i)[0], ffn_or_moe_tensors)

    def derived_tensors(self):
        return hybrid_derived(self.cfg, mamba2_tensors)

    def create_memories(self, n_ctx, n_ubatch, alloc, flash_attn, n_seq_max):
        return hybrid_memories(self.cfg, mamba_state, n_ctx, alloc, flash_attn, n_seq_max, mamba2_channels(self.cfg))

    def build(self, g: GraphBuilder, io: BuildIO) -> None:
        c, e = self.cfg, self.cfg.extra
        w = lambda name: g.weight(name, self.shapes[name])  # noqa: E731
        x = g.get_rows(w("token_embd.weight"), io.tokens)
        if e["embedding_scale"]:
            x = g.scale(x, e["embedding_scale"])
        for i in range(c.n_layer):
            h = rms_norm(g, x, w(f"blk.{i}.attn_norm.weight"), c.rms_eps)
            if i in e["attention_layers"]:
                y = g.matmul(self_attention(g, w, io, c, i, h, neox=False, rope=e["rope"],
                                            scale=e["attention_scale"]), w(f"blk.{i}.attn_output.weight"))
            else:
                y = mamba2_mixer(g, w, io, c, i, h)
            if i == c.n_layer - 1:
                y, x = io.select_outputs(y), io.select_outputs(x)
            x = g.add(x, g.scale(y, e["residual_scale"]) if e["residual_scale"] else y)
            h = rms_norm(g, x, w(f"blk.{i}.ffn_norm.weight"), c.rms_eps)
            y = ffn_or_moe(g, w, c, i, h, norm_weights=True)
            x = g.add(x, g.scale(y, e["residual_scale"]) if e["residual_scale"] else y)
        logits = g.matmul(rms_norm(g, x, w("output_norm.weight"), c.rms_eps), w("output.weight"))
        g.output("logits", g.scale(logits, 1.0 / e["logit_scale"]) if e["logit_scale"] else logits)
