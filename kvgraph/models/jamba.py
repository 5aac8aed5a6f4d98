"""jamba (Jamba): attention layers (no positional encoding) and Mamba-1 layers (dt/B/C RMS-normed with their
own weights), the pattern read from the per-layer head_count_kv (0: Mamba); each layer's FFN dense or a
mixture of experts (softmax router, top-k, weights not renormalised), as the file's tensors say."""
from __future__ import annotations

from ..gguf.config import MetadataView
from ..graph.ir import GraphBuilder
from .base import BuildIO, Model
from .layers import (attention_tensors, decoder, ffn_tensors, gated_ffn, hybrid_derived, hybrid_memories, mamba_mixer,
                     mamba_sizes, mamba_state, mamba_tensors, moe_ffn, moe_tensors, output_tensors, self_attention)


class JambaModel(Model):
    arch = "jamba"
    optional_tensors = frozenset({"output.weight"})

    @classmethod
    def read_extra(cls, m: MetadataView):
        kv = m.int_list("attention.head_count_kv") or [m.int("attention.head_count_kv", 1)] * m.int("block_count")
        return mamba_sizes(m) | {"attention_layers": tuple(i for i, n in enumerate(kv) if n),
                                 "n_expert": m.int("expert_count", 0, minimum=0),
                                 "n_expert_used": m.int("expert_used_count", 0, minimum=0)}

    @classmethod
    def read_layout(cls, cfg, tensor_names):
        return {"moe_layers": tuple(i for i in range(cfg.n_layer) if f"blk.{i}.ffn_gate_inp.weight" in tensor_names)}

    def tensor_shapes(self):
        c, e = self.cfg, self.cfg.extra
        shapes = output_tensors(c)
        for i in range(c.n_layer):
            if i in e["attention_layers"]:
                shapes |= attention_tensors(c, i)
            else:
                s, r = e["d_state"], e["dt_rank"]
                shapes |= {f"blk.{i}.attn_norm.weight": (c.n_embd,), f"blk.{i}.ssm_dt_norm.weight": (r,),
                           f"blk.{i}.ssm_b_norm.weight": (s,), f"blk.{i}.ssm_c_norm.weight": (s,)}
                shapes |= mamba_tensors(c, i)[0]
            shapes |= moe_tensors(c, i) if i in e["moe_layers"] else ffn_tensors(c, i)
        return shapes

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

        def ffn(i, h):
            return moe_ffn(g, w, c, i, h, norm_weights=False) if i in e["moe_layers"] else gated_ffn(g, w, i, h)
        decoder(g, w, io, c, mixer, ffn, project=False)
