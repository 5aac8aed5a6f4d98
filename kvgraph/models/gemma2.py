"""gemma2 (Gemma 2): embeddings scaled by sqrt(n_embd), NEOX RoPE, attention-score and final-logit
soft-capping (cap * tanh(x / cap)), post-attention and post-FFN norms, GELU-tanh gated FFN, sliding-window
attention on every other layer (the even ones, as llama.cpp), output tied to the embedding."""
from __future__ import annotations

import math

from ..gguf.config import MetadataView
from ..graph.ir import GraphBuilder
from .base import BuildIO, Model
from .layers import decoder_tensors, gated_ffn, rms_norm, self_attention, swa_memories, swa_pattern

DEFAULT_WINDOW = 4096   # Gemma 2's, when the file does not say


class Gemma2Model(Model):
    arch = "gemma2"
    optional_tensors = frozenset({"output.weight"})

    @classmethod
    def read_extra(cls, m: MetadataView):
        n_layer, n_embd, n_head = (m.int(k, required=True) for k in ("block_count", "embedding_length",
                                                                       "attention.head_count"))
        # Gemma 2 27B (46 layers) scales queries by its n_embd / n_head, not its head size (llama.cpp does too).
        scale = m.float("attention.scale") or (1.0 / math.sqrt(n_embd / n_head) if n_layer == 46 else None)
        return {"sliding_window": m.int("attention.sliding_window", DEFAULT_WINDOW), "attention_scale": scale,
                "swa_layers": swa_pattern(m, 2), "attn_softcap": m.softcap("attn_logit_softcapping"),
                "rope_base_swa": m.float("rope.freq_base_swa")}

    def tensor_shapes(self):
        c = self.cfg
        return decoder_tensors(c) | {f"blk.{i}.{norm}.weight": (c.n_embd,) for i in range(c.n_layer)
                                     for norm in ("post_attention_norm", "post_ffw_norm")}

    def create_memories(self, n_ctx, n_ubatch, alloc, flash_attn, n_seq_max):
        e = self.cfg.extra
        # Soft-capped scores take the non-flash path, whose V cache is transposed.
        return swa_memories(self.cfg, e["swa_layers"], e["sliding_window"], n_ctx, n_ubatch, alloc,
                            flash_attn and not e["attn_softcap"], n_seq_max)

    def build(self, g: GraphBuilder, io: BuildIO) -> None:
        c, e = self.cfg, self.cfg.extra
        w = lambda name: g.weight(name, self.shapes[name])  # noqa: E731
        x = g.scale(g.get_rows(w("token_embd.weight"), io.tokens), math.sqrt(c.n_embd))
        for i in range(c.n_layer):
            h = rms_norm(g, x, w(f"blk.{i}.attn_norm.weight"), c.rms_eps)
            local = e["swa_layers"][i]
            a = self_attention(g, w, io, c, i, h, neox=True, memory="kv_swa" if local else "kv",
                               rope_base=(e["rope_base_swa"] or c.rope_base) if local else c.rope_base,
                               scale=e["attention_scale"],
                               softcap=e["attn_softcap"])
            if i == c.n_layer - 1:
                a, x = io.select_outputs(a), io.select_outputs(x)
            a = g.matmul(a, w(f"blk.{i}.attn_output.weight"))
            x = g.add(x, rms_norm(g, a, w(f"blk.{i}.post_attention_norm.weight"), c.rms_eps))
            ff = gated_ffn(g, w, i, rms_norm(g, x, w(f"blk.{i}.ffn_norm.weight"), c.rms_eps), act="geglu")
            x = g.add(x, rms_norm(g, ff, w(f"blk.{i}.post_ffw_norm.weight"), c.rms_eps))
        logits = g.matmul(rms_norm(g, x, w("output_norm.weight"), c.rms_eps), w("output.weight"))
        g.output("logits", g.softcap(logits, c.final_logit_softcap) if c.final_logit_softcap else logits)
