"""qwen35 and qwen35moe (Qwen3.5, dense and mixture of experts): Qwen3-Next's hybrid of gated delta-net
layers and gated attention (attention.recurrent_layers), with what Qwen3.5's files do differently: beta and
alpha in their own projections (ssm_beta, ssm_alpha), the value heads tiled over the key heads (the converter
reorders them so), and interleaved MRoPE sections, which for text positions are NEOX rope on the pairs the
sections cover (every real file's: all of them). qwen35's FFN is a dense SwiGLU after the post-attention
norm; qwen35moe's Qwen3-Next's experts plus gated shared expert. Norm weights are used as stored (the
converter wrote 1 + w); without output.weight the output is tied to the token embedding."""
from __future__ import annotations

from ..gguf.config import MetadataView
from ..graph.ir import GraphBuilder
from .layers import ffn_tensors, gated_ffn, text_imrope_factors
from .qwen3next import FFN_NORM, Qwen3NextModel


class Qwen35MoeModel(Qwen3NextModel):
    """Qwen3-Next's trunk and FFN with Qwen3.5's delta-net layout and rope sections."""
    arch = "qwen35moe"
    split_ba = v_tiled = True

    @classmethod
    def read_extra(cls, m: MetadataView):
        # llama.cpp requires the sections (a file without them, or with ones that do not fit, is refused here)
        head = m.int("embedding_length", required=True) // m.int("attention.head_count", required=True)
        head_k = m.int("attention.key_length", head)
        rope = text_imrope_factors(m, m.int("rope.dimension_count", head_k, minimum=0), head_k)
        return super().read_extra(m) | {"rope_factors": rope}

    def rope_factors(self):
        return self.cfg.extra["rope_factors"]


class Qwen35Model(Qwen35MoeModel):
    """The same with a dense FFN in every layer."""
    arch = "qwen35"

    @classmethod
    def read_ffn(cls, m: MetadataView) -> dict:
        return {}                       # a dense FFN, feed_forward_length wide

    def ffn_tensors(self, i: int) -> dict[str, tuple[int, ...]]:
        return ffn_tensors(self.cfg, i, norm=FFN_NORM)

    def ffn(self, g: GraphBuilder, w, i: int, h):
        return gated_ffn(g, w, i, h)
