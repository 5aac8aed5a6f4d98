"""GGUF metadata -> ModelConfig: the hyper-parameters every architecture reads, validated once."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..errors import GGUFError, UnsupportedModelError
from .reader import array_length, gguf_type


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    name: str
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim_k: int
    head_dim_v: int
    n_vocab: int
    n_ctx_train: int
    rms_eps: float
    rope_dims: int
    rope_base: float
    rope_base_swa: float
    rope_freq_scale: float
    sliding_window: int | None = None
    swa_layers: tuple[bool, ...] = ()
    final_logit_softcap: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


# How llama.cpp reads metadata (llama-model-loader.cpp, GGUFMeta::GKV::get_kv): a scalar key must be stored as
# exactly the type it is read as -- uint32 for every integer hyper-parameter and token id, float32 for every
# real one, bool, string -- and an integer array (per-layer head counts, flags) may hold int32 or uint32.
# Another type is refused ("key ... has wrong type i32 but expected type f32"), and so is it here: a value
# whose type id was changed keeps its bytes, so a float32 10000.0 relabelled int32 would be the rope base
# 1176256512, silently.
UINT32, FLOAT32, BOOL, STRING = ("uint32",), ("float32",), ("bool",), ("string",)
INT_ARRAY = ("array of int32", "array of uint32")


def wrong_type(source: str, key: str, found: str, expected: tuple[str, ...]) -> str:
    """The message for a metadata value stored with a type it is not read as."""
    return (f"{source}: metadata key {key!r} is stored as {found}, but it is read as {' or '.join(expected)} "
            "(llama.cpp refuses it too); the file is corrupt or was written by a broken converter. Re-download "
            "it, or re-convert the model with a current llama.cpp.")


class MetadataView:
    """Typed access to `{arch}.*` keys with clear errors for missing or mistyped values: a file's value must be
    stored as the type llama.cpp reads it as (above); a plain dict's value must be of the Python kind."""

    def __init__(self, md: Mapping[str, Any], arch: str, source: str):
        self.md, self.arch, self.source = md, arch, source

    def _get(self, key: str, kinds: tuple[type, ...], default: Any, what: str, stored: tuple[str, ...]) -> Any:
        full = key if "." in key and key.split(".")[0] in ("general", "tokenizer") else f"{self.arch}.{key}"
        if full not in self.md:
            if default is _REQUIRED:
                raise GGUFError(f"{self.source}: metadata key {full!r} is missing; the file is incomplete.")
            return default
        found = gguf_type(self.md, full)
        if found is not None and found not in stored:
            raise GGUFError(wrong_type(self.source, full, found, stored))
        value = self.md[full]
        if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
            raise GGUFError(f"{self.source}: metadata key {full!r} should be {what}, got {type(value).__name__} "
                            f"{str(value)[:40]!r}; the file is corrupt.")
        return value

    def int(self, key: str, default: Any = None, *, required: bool = False, minimum: int = 1) -> Any:
        value = self._get(key, (int,), _REQUIRED if required else default, "an integer", UINT32)
        if isinstance(value, int) and not (minimum <= value < 1 << 31):
            raise GGUFError(f"{self.source}: metadata {self.arch}.{key} = {value} is out of range.")
        return value

    def int_list(self, key: str, default: Any = None) -> Any:
        value = self._get(key, (list,), default, "a list of integers", INT_ARRAY)
        if value is not None and not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise GGUFError(f"{self.source}: metadata {self.arch}.{key} should be a list of integers.")
        return value

    def float(self, key: str, default: Any = None, *, required: bool = False) -> Any:
        value = self._get(key, (int, float), _REQUIRED if required else default, "a number", FLOAT32)
        return None if value is None else float(value)

    def softcap(self, key: str) -> float | None:
        """A soft-capping value (cap * tanh(x / cap)): a positive finite number, or None for none (absent or
        0). A negative, infinite or NaN cap is refused: it would turn every logit or score into NaN."""
        value = self.float(key)
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise GGUFError(f"{self.source}: metadata {self.arch}.{key} = {value} is not a soft-capping value (a "
                            "positive number, or 0 for none); the file is corrupt.")
        return value or None

    def flag(self, key: str, default: bool) -> bool:
        return self._get(key, (bool,), default, "true or false", BOOL)

    def str(self, key: str, default: Any = None) -> Any:
        return self._get(key, (str,), default, "a string", STRING)

    def any_of(self, key: str, default: Any, stored: tuple[str, ...]) -> Any:
        """The value at key, of whichever of the types in stored the file has (checked by the caller)."""
        return self._get(key, (object,), default, "", stored)


_REQUIRED = object()


def read_config(md: Mapping[str, Any], arch: str, source: str = "model") -> ModelConfig:
    m = MetadataView(md, arch, source)
    n_embd = m.int("embedding_length", required=True)
    n_head = m.int("attention.head_count", required=True, minimum=0)
    if n_head == 0:        # no attention at all (Mamba): no attention hyper-parameters either
        n_head_kv = head_dim_k = head_dim_v = 0
    else:
        kv = m.any_of("attention.head_count_kv", None, UINT32 + INT_ARRAY)
        if isinstance(kv, list):    # per layer (Jamba, Granite hybrid): 0 marks a layer without attention
            kv_heads = m.int_list("attention.head_count_kv")
            if len(kv_heads) != m.int("block_count", required=True) or min(kv_heads) < 0 or not max(kv_heads):
                raise GGUFError(f"{source}: attention.head_count_kv {kv_heads} does not fit the layers.")
            n_head_kv = max(kv_heads)
        else:
            n_head_kv = m.int("attention.head_count_kv", n_head)
        head_dim_k = m.int("attention.key_length", n_embd // n_head)
        head_dim_v = m.int("attention.value_length", n_embd // n_head)
        if n_embd % n_head or n_head % n_head_kv:
            raise GGUFError(f"{source}: {n_head} attention heads / {n_head_kv} kv heads do not divide "
                            f"embedding length {n_embd}; the file is corrupt.")
    scaling = m.str("rope.scaling.type", "none")
    if scaling not in ("none", "linear"):
        # YaRN / LongRoPE change every position's frequencies: refused rather than run silently wrong.
        raise UnsupportedModelError(f"{source}: RoPE scaling {scaling!r} ({arch}.rope.scaling.type) is not "
                                    "supported; kvgraph runs 'none' and 'linear' (and llama3 frequency factors).")
    n_tokens = array_length(md, "tokenizer.ggml.tokens")
    n_vocab = m.int("vocab_size", n_tokens)
    if n_vocab is None:
        raise GGUFError(f"{source}: no vocabulary size ({arch}.vocab_size or tokenizer.ggml.tokens).")
    if n_tokens is not None and n_vocab != n_tokens:
        # The embedding rows and the tokenizer's ids must be the same set (llama.cpp refuses such files too):
        # otherwise the tokenizer makes ids the model has no row for, or the model samples ids with no text.
        raise GGUFError(f"{source}: {arch}.vocab_size is {n_vocab} but tokenizer.ggml.tokens has {n_tokens} "
                        "tokens; the file is inconsistent.")
    return ModelConfig(
        arch=arch,
        name=m.str("general.name", arch),
        n_layer=m.int("block_count", required=True),
        n_embd=n_embd,
        n_ff=m.int("feed_forward_length", required=True, minimum=0),
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim_k=head_dim_k,
        head_dim_v=head_dim_v,
        n_vocab=n_vocab,
        n_ctx_train=m.int("context_length", 2048),
        rms_eps=m.float("attention.layer_norm_rms_epsilon", 1e-5),
        rope_dims=m.int("rope.dimension_count", head_dim_k, minimum=0),
        rope_base=m.float("rope.freq_base", 10000.0),
        rope_base_swa=m.float("rope.freq_base_swa", 10000.0),
        rope_freq_scale=1.0 / m.float("rope.scaling.factor", 1.0) if scaling == "linear" else 1.0,
        sliding_window=m.int("attention.sliding_window", minimum=0) or None,   # 0: no window (Phi-3's files)
        final_logit_softcap=m.softcap("final_logit_softcapping"),
    )
