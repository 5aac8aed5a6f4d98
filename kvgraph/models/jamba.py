"""jamba (Jamba): attention layers (no positional encoding) and Mamba-1 layers (dt/B/C RMS-normed with their
own weights), the pattern read from the per-layer head_count_kv (0: Mamba); each layer's FFN dense or a
mixture of experts (softmax router, top-k, weights not renormalised), as the file's tensors say."""
from __future__ import annotations

from ..gguf.config import MetadataView
from ..graph.ir import GraphBuilder
from .base import BuildIO, Model
from .layers import (attention_layers, decoder, ffn_or_moe, ffn_or_moe_tensors, hybrid_derived, hybrid_memories,
                     hybrid_tensors, mamba_mixer, mamba_sizes, mamba_state, mamba_tensors, moe_layout, moe_sizes,
                     output_tensors, self_attention)


class JambaModel(Model):
    arch = "jamba"
    optional_tensors = frozenset({"output.weight"})

    @classmethod
    def read_extra(cls, m: MetadataView):
        return mamba_sizes(m) | moe_sizes(m) | {"attention_layers": attention_layers(m)}

    @classmethod
    def read_layout(cls, cfg, tensor_names):
        return moe_layout(cfg, tensor_names)

    def tensor_shapes(self):
        c, e = self.cfg, self.cfg.extra
        s, r = e["d_state"], e["dt_rank"]

        def mamba(i):          # Mamba-1 with dt / B / C normed by their own weights
            return {f"blk.{i}.ssm_dt_norm.weight": (r,), f"blk.{i}.ssm_b_norm.weight": (s,),
                    f"blk.{i}.ssm_c_norm.weight": (s,)} | mamba_tensors(c, i)[0]
        return hybrid_tensors(c, output_tensors(c), mamba, ffn_or_moe_tensors)

    def derived_tensors(self):
        return hybrid_derived(self.cfg, mamba_tensors)

    def create_memories(self, n_ctx, n_ubatch, alloc, flash_attn, n_seq_max):
        return hybrid_memories(self.cfg, mamba_state, n_ctx, alloc, flash_attn, n_seq_max)

    def build(self, g: GraphBuilder, io: BuildIO) -> None:
        c, e = self.cfg, self.cfg.extra
        w = lambda name: g.weight(name, self.shapes[name])  # noqa: E731

        def mixer(i, h):
            if i in e["attention_layers"]:
                return g.matmul(self_attention(g, w, io, c, i, h, neox=False, rope=False),
                                w(f"blk.{i}.attn_output.weight"))
            return mamba_mixer(g, w, io, c, i, h, dt_b_c_norms=True)

        decoder(g, w, io, c, mixer, lambda i, h: ffn_or_moe(g, w, c, i, h, norm_weights=False), project=False)
