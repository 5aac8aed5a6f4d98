"""qwen3 (dense Qwen3): Qwen2's block without biases, with per-head q/k RMSNorm before NEOX RoPE and an
explicit head size (attention.key_length, which need not be n_embd / n_head)."""
from __future__ import annotations

from .qwen2 import Qwen2Model


class Qwen3Model(Qwen2Model):
    arch = "qwen3"
    attention = {"qk_norm": True}
