"""qwen3moe (Qwen3-30B-A3B, Qwen3-Coder-30B-A3B): Qwen3's attention block (per-head q/k RMSNorm, NEOX RoPE),
every layer's FFN a mixture of experts -- softmax router, the top-k renormalised, as llama.cpp runs it --
each expert expert_feed_forward_length wide."""
from __future__ import annotations

from ..errors import GGUFError
from ..gguf.config import MetadataView
from ..graph.ir import GraphBuilder
from .base import BuildIO
from .layers import decoder, decoder_tensors, moe_ffn, moe_sizes, moe_tensors, self_attention
from .qwen3 import Qwen3Model


class Qwen3MoeModel(Qwen3Model):
    arch = "qwen3moe"

    @classmethod
    def read_extra(cls, m: MetadataView):
        n_layer, experts = m.int("block_count", required=True), moe_sizes(m)
        if not 0 < experts["n_expert_used"] <= experts["n_expert"]:
            raise GGUFError(f"{m.source}: qwen3moe uses 1..{experts['n_expert']} of its {experts['n_expert']} experts "
                            f"per token; the file says {experts['n_expert_used']}.")
        # llama.cpp's fallback for files without the expert width: feed_forward_length / experts used
        n_ff_exp = (m.int("expert_feed_forward_length", 0, minimum=0)
                    or m.int("feed_forward_length", required=True) // experts["n_expert_used"])
        return experts | {"moe_layers": tuple(range(n_layer)), "n_ff_exp": n_ff_exp}

    def tensor_shapes(self):
        return decoder_tensors(self.cfg, lambda c, i: moe_tensors(c, i, c.extra["n_ff_exp"]), **self.attention)

    def build(self, g: GraphBuilder, io: BuildIO) -> None:
        c = self.cfg
        w = lambda name: g.weight(name, self.shapes[name])  # noqa: E731
        decoder(g, w, io, c, lambda i, h: self_attention(g, w, io, c, i, h, neox=True, **self.attention),
                lambda i, h: moe_ffn(g, w, c, i, h, norm_weights=True))
