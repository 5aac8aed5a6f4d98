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
    # The delta-net's layout (delta_net_tensors / delta_net_mixer options; Qwen3.5 sets both)
    split_ba = False
    v_tiled = False

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
        k_dim, v_dim = m.int("attention.key_length", head), m.int("attention.value_length", head)
        experts = cls.read_ffn(m)
        n_exp, used = experts.get("n_expert"), experts.get("n_expert_used")
        moe = (f" and 1..{n_exp} of its {n_exp} experts used", f" and {used}") if experts else ("", "")
        if k_dim != v_dim or experts and not 0 < used <= n_exp:
            raise GGUFError(f"{m.source}: {cls.arch} needs equal key and value head sizes (one gate per value)"
                            f"{moe[0]}; the file has {k_dim} / {v_dim}{moe[1]}.")
        return delta_net_sizes(m) | experts | {
            "n_nextn": n_nextn,
            "attention_layers": tuple(i for i in attention_layers_of_flags(m) if i < n_layer - n_nextn),
            "moe_layers": tuple(range(n_layer - n_nextn)) if experts else ()}   # every layer's FFN (as llama.cpp)

    @classmethod
    def read_ffn(cls, m: MetadataView) -> dict:
        """The FFN's hyper-parameters: every layer's experts and shared expert."""
        return moe_sizes(m) | {"n_ff_exp": m.int("expert_feed_forward_length", required=True),
                               "n_ff_shexp": m.int("expert_shared_feed_forward_length", required=True)}

    @classmethod
    def read_layout(cls, cfg, tensor_names):
        recurrent = [i for i in range(cfg.n_layer) if i not in cfg.extra["attention_layers"]]
        return {"ssm_in": bool(recurrent) and f"blk.{recurrent[0]}.ssm_in.weight" in tensor_names}

    def skipped_tensors(self):
        """The multi-token-prediction block's (a draft head kvgraph does not run)."""
        return tuple(f"blk.{i}." for i in range(self.cfg.n_layer, self.cfg.n_layer + self.cfg.extra["n_nextn"]))

    def ffn_tensors(self, i: int) -> dict[str, tuple[int, ...]]:
        c, e = self.cfg, self.cfg.extra
        return moe_tensors(c, i, e["n_ff_exp"], FFN_NORM) | shared_expert_tensors(c, i, e["n_ff_shexp"])

    def ffn(self, g: GraphBuilder, w, i: int, h):
        return moe_shared_ffn(g, w, self.cfg, i, h, norm_weights=True)

    def rope_factors(self):
        """freq_factors of the attention layers' RoPE (None: plain NEOX rope)."""
        return None

    def tensor_shapes(self):
        c = self.cfg
        return hybrid_tensors(c, output_tensors(c), lambda i: delta_net_tensors(c, i, self.split_ba),
                              lambda c, i: self.ffn_tensors(i), qk_norm=True, gated=True)

    def create_memories(self, n_ctx, n_ubatch, alloc, flash_attn, n_seq_max):
        return hybrid_memories(self.cfg, mamba_state, n_ctx, alloc, flash_attn, n_seq_max, delta_net_channels(self.cfg))

    def build(self, g: GraphBuilder, io: BuildIO) -> None:
        c, e = self.cfg, self.cfg.extra
        w = lambda name: g.weight(name, self.shapes[name])  # noqa: E731
        factors = self.rope_factors()

        def mixer(i, h):
            if i in e["attention_layers"]:
                return g.matmul(self_attention(g, w, io, c, i, h, neox=True, qk_norm=True, gated=True,
                                               freq_factors=factors), w(f"blk.{i}.attn_output.weight"))
            return delta_net_mixer(g, w, io, c, i, h, self.split_ba, self.v_tiled)

        decoder(g, w, io, c, mixer, lambda i, h: self.ffn(g, w, i, h), project=False, ffn_norm=FFN_NORM)
