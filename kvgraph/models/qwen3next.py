"""qwen3next (Qwen3-Next): gated delta-net layers (linear attention with a per-sequence state) and, where
attention.recurrent_layers says (else every full_attention_interval-th layer), gated attention: per-head q/k
RMSNorm, partial NEOX RoPE, the output scaled by sigmoid of a gate from the q projection. Every layer's FFN,
after its post-attention norm, is a mixture of experts (softmax router, top-k renormalised) plus a shared
expert gated by sigmoid(ffn_gate_inp_shexp x). Norm weights are used as stored (the converter wrote 1 + w)."""
from __future__ import annotations

import dataclasses

from ..errors import GGUFError
from ..gguf.config import MetadataView
from ..graph.ir import GraphBuilder
from .base import BuildIO, Model
from .layers import (attention_layers_of_flags, decoder, delta_net_channels, delta_net_mixer, delta_net_sizes,
                     delta_net_tensors, hybrid_memories, hybrid_tensors, mamba_state, moe_shared_ffn, moe_sizes,
                     moe_tensors, output_tensors, self_attention, shared_expert_tensors)

FFN_NORM = "post_attention_norm.weight"


class Qwen3NextModel(Model):
    arch = "qwen3next"
    optional_tensors = frozenset({"output.weight"})

    def __init__(self, cfg):
        # block_count counts the multi-token-prediction block after the trunk's layers; the graph runs the trunk
        super().__init__(dataclasses.replace(cfg, n_layer=cfg.n_layer - cfg.extra["n_nextn"]))

    @classmethod
    def read_extra(cls, m: MetadataView):
        n_layer, n_nextn = m.int("block_count", required=True), m.int("nextn_predict_layers", 0, minimum=0)
        if n_nextn >= n_layer:
            raise GGUFError(f"{m.source}: {n_nextn} of its {n_layer} layers are multi-token-prediction layers; "
                            "the file is inconsistent.")
        head = m.int("embedding_length", required=True) // m.int("attention.head_count", required=True)
        k_dim, v_dim, experts = m.int("attention.key_length", head), m.int("attention.value_length", head), moe_sizes(m)
        if k_dim != v_dim or not 0 < experts["n_expert_used"] <= experts["n_expert"]:
            raise GGUFError(f"{m.source}: qwen3next needs equal key and value head sizes (one gate per value) and "
                            f"1..{experts['n_expert']} of its {experts['n_expert']} experts used; the file has "
                            f"{k_dim} / {v_dim} and {experts['n_expert_used']}.")
        return delta_net_sizes(m) | experts | {
            "n_nextn": n_nextn,
            "attention_layers": tuple(i for i in attention_layers_of_flags(m) if i < n_layer - n_nextn),
            "n_ff_exp": m.int("expert_feed_forward_length", required=True),
            "n_ff_shexp": m.int("expert_shared_feed_forward_length", required=True),
            "moe_layers": tuple(range(n_layer - n_nextn))}    # every layer's FFN (as llama.cpp)

    @classmethod
    def read_layout(cls, cfg, tensor_names):
        recurrent = [i for i in range(cfg.n_layer) if i not in cfg.extra["attention_layers"]]
        return {"ssm_in": bool(recurrent) and f"blk.{recurrent[0]}.ssm_in.weight" in tensor_names}

    def skipped_tensors(self):
        """The multi-token-prediction block's (a draft head kvgraph does not run)."""
        return tuple(f"blk.{i}." for i in range(self.cfg.n_layer, self.cfg.n_layer + self.cfg.extra["n_nextn"]))

    def tensor_shapes(self):
        c, e = self.cfg, self.cfg.extra

        def ffn(c, i):
            return moe_tensors(c, i, e["n_ff_exp"], FFN_NORM) | shared_expert_tensors(c, i, e["n_ff_shexp"])
        return hybrid_tensors(c, output_tensors(c), lambda i: delta_net_tensors(c, i), ffn, qk_norm=True, gated=True)

    def create_memories(self, n_ctx, n_ubatch, alloc, flash_attn, n_seq_max):
        return hybrid_memories(self.cfg, mamba_state, n_ctx, alloc, flash_attn, n_seq_max, delta_net_channels(self.cfg))

    def build(self, g: GraphBuilder, io: BuildIO) -> None:
        c, e = self.cfg, self.cfg.extra
        w = lambda name: g.weight(name, self.shapes[name])  # noqa: E731

        def mixer(i, h):
            if i in e["attention_layers"]:
                return g.matmul(self_attention(g, w, io, c, i, h, neox=True, qk_norm=True, gated=True),
                                w(f"blk.{i}.attn_output.weight"))
            return delta_net_mixer(g, w, io, c, i, h)

        decoder(g, w, io, c, mixer, lambda i, h: moe_shared_ffn(g, w, c, i, h, norm_weights=True), project=False,
                ffn_norm=FFN_NORM)
