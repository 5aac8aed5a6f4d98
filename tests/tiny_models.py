"""Tiny GGUF models written by the tests themselves (random weights, real file format).

`write_tiny_llama` produces a complete llama-architecture file with a byte-level BPE tokenizer; `TinySpec`
says what goes in it, and the `tensors` it returns are the exact float32 values the file decodes to, for
independent reference implementations.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

from kvgraph.tokenizer.build import bytes_to_unicode

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def byte_level_alphabet() -> list[str]:
    """GPT-2's byte -> printable character mapping, in byte order."""
    table = bytes_to_unicode()
    return [table[b] for b in range(256)]


def tiny_tokenizer_metadata(arch: str = "llama") -> dict:
    alphabet = byte_level_alphabet()
    merges = ["Ġ t", "h e", "Ġt he", "i n", "a n"]
    merged = ["Ġt", "he", "Ġthe", "in", "an"]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens = specials + alphabet + merged
    types = [3] * len(specials) + [1] * (len(alphabet) + len(merged))
    return {"tokens": tokens, "types": types, "merges": merges, "bos": 1, "eos": 2}


@dataclass
class TinySpec:
    n_layer: int = 2
    n_embd: int = 32
    n_head: int = 4
    n_head_kv: int = 2
    n_ff: int = 64
    n_ctx_train: int = 256
    rope_base: float = 10000.0
    rms_eps: float = 1e-5
    weight_type: str = "F32"          # type of the 2-D matrices: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0
    tied_output: bool = True
    seed: int = 0
    arch: str = "llama"
    drop_tensors: tuple[str, ...] = ()
    override_shapes: dict = field(default_factory=dict)
    extra_kv: dict = field(default_factory=dict)
    chat_template: str = CHATML

def _start(path, arch: str, name: str, n_layer: int, n_ctx: int, n_embd: int, n_ff: int, n_head: int,
           n_head_kv: int, rope_base: float, rms_eps: float) -> tuple[gguf.GGUFWriter, int]:
    """A writer with the hyper-parameters every test architecture shares and the tiny byte-level BPE
    tokenizer; returns it with the vocabulary size."""
    tok = tiny_tokenizer_metadata()
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name)
    w.add_block_count(n_layer)
    w.add_context_length(n_ctx)
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_rope_freq_base(rope_base)
    w.add_layer_norm_rms_eps(rms_eps)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tok["tokens"])
    w.add_token_types(tok["types"])
    w.add_token_merges(tok["merges"])
    w.add_bos_token_id(tok["bos"])
    w.add_eos_token_id(tok["eos"])
    return w, len(tok["tokens"])


def _random_value(rng: np.random.Generator, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """Norm weights near 1, matrices scaled by 1/sqrt(fan-in), recurrent A negative (a decaying state)."""
    if name.endswith("ssm_a"):
        value = -np.exp(rng.uniform(-1.0, 1.0, shape))
    elif name.endswith("ssm_dt.bias"):
        value = rng.uniform(-2.0, 0.0, shape)
    elif len(shape) == 1:
        value = 1.0 + 0.1 * rng.standard_normal(shape)
    else:
        value = rng.standard_normal(shape) / np.sqrt(shape[-1])
    return value.astype(np.float32)


def _finish(w: gguf.GGUFWriter) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _store(writer: gguf.GGUFWriter, name: str, value: np.ndarray, qtype: str) -> np.ndarray:
    """Write value as qtype; return the float32 array the file decodes to."""
    if qtype == "F32" or value.ndim == 1:
        writer.add_tensor(name, value.astype(np.float32))
        return value.astype(np.float32)
    t = gguf.GGMLQuantizationType[qtype]
    if qtype == "F16":
        writer.add_tensor(name, value.astype(np.float16))
        return value.astype(np.float16).astype(np.float32)
    q = gguf.quants.quantize(value.astype(np.float32), t)
    writer.add_tensor(name, q, raw_shape=q.shape, raw_dtype=t)
    return gguf.quants.dequantize(q, t).astype(np.float32).reshape(value.shape)


def write_tiny_llama(path: str | Path, spec: TinySpec | None = None) -> dict[str, np.ndarray]:
    spec = spec or TinySpec()
    rng = np.random.default_rng(spec.seed)
    hd = spec.n_embd // spec.n_head
    w, n_vocab = _start(path, spec.arch, "tiny-llama-test", spec.n_layer, spec.n_ctx_train, spec.n_embd, spec.n_ff,
                        spec.n_head, spec.n_head_kv, spec.rope_base, spec.rms_eps)
    w.add_rope_dimension_count(hd)
    w.add_vocab_size(n_vocab)
    w.add_add_bos_token(False)
    w.add_chat_template(spec.chat_template)
    for key, value in spec.extra_kv.items():
        if isinstance(value, str):
            w.add_string(key, value)
        else:
            w.add_uint32(key, value)

    shapes = {"token_embd.weight": (n_vocab, spec.n_embd), "output_norm.weight": (spec.n_embd,)}
    if not spec.tied_output:
        shapes["output.weight"] = (n_vocab, spec.n_embd)
    kv = spec.n_head_kv * hd
    for i in range(spec.n_layer):
        shapes |= {
            f"blk.{i}.attn_norm.weight": (spec.n_embd,), f"blk.{i}.attn_q.weight": (spec.n_embd, spec.n_embd),
            f"blk.{i}.attn_k.weight": (kv, spec.n_embd), f"blk.{i}.attn_v.weight": (kv, spec.n_embd),
            f"blk.{i}.attn_output.weight": (spec.n_embd, spec.n_embd), f"blk.{i}.ffn_norm.weight": (spec.n_embd,),
            f"blk.{i}.ffn_gate.weight": (spec.n_ff, spec.n_embd), f"blk.{i}.ffn_up.weight": (spec.n_ff, spec.n_embd),
            f"blk.{i}.ffn_down.weight": (spec.n_embd, spec.n_ff),
        }
    shapes |= spec.override_shapes
    tensors = {}
    for name, shape in shapes.items():
        if name in spec.drop_tensors:
            continue
        qtype = "F32" if name == "token_embd.weight" and spec.weight_type not in ("F32", "Q8_0") else spec.weight_type
        tensors[name] = _store(w, name, _random_value(rng, name, shape), qtype)
    _finish(w)
    return tensors


@dataclass
class HybridSpec:
    n_layer: int = 4
    attention_layers: tuple[int, ...] = (1,)
    n_embd: int = 32
    n_head: int = 4
    n_head_kv: int = 2
    n_ff: int = 64
    d_inner: int = 24
    d_state: int = 6
    d_conv: int = 4
    rms_eps: float = 1e-5
    rope_base: float = 10000.0
    seed: int = 0


def write_tiny_hybrid(path: str | Path, spec: HybridSpec | None = None) -> dict[str, np.ndarray]:
    """A `kvgraph-hybrid` file: attention layers at spec.attention_layers, Mamba-like layers elsewhere."""
    spec = spec or HybridSpec()
    rng = np.random.default_rng(spec.seed)
    arch = "kvgraph-hybrid"
    hd = spec.n_embd // spec.n_head
    w, n_vocab = _start(path, arch, "tiny-hybrid-test", spec.n_layer, 512, spec.n_embd, spec.n_ff, spec.n_head,
                        spec.n_head_kv, spec.rope_base, spec.rms_eps)
    w.add_array(f"{arch}.attention_layers", list(spec.attention_layers))
    w.add_uint32(f"{arch}.ssm.inner_size", spec.d_inner)
    w.add_uint32(f"{arch}.ssm.state_size", spec.d_state)
    w.add_uint32(f"{arch}.ssm.conv_kernel", spec.d_conv)
    d, s, k, E = spec.d_inner, spec.d_state, spec.d_conv, spec.n_embd
    shapes = {"token_embd.weight": (n_vocab, E), "output_norm.weight": (E,)}
    for i in range(spec.n_layer):
        shapes |= {f"blk.{i}.attn_norm.weight": (E,), f"blk.{i}.ffn_norm.weight": (E,),
                   f"blk.{i}.ffn_gate.weight": (spec.n_ff, E), f"blk.{i}.ffn_up.weight": (spec.n_ff, E),
                   f"blk.{i}.ffn_down.weight": (E, spec.n_ff)}
        if i in spec.attention_layers:
            shapes |= {f"blk.{i}.attn_q.weight": (E, E), f"blk.{i}.attn_k.weight": (spec.n_head_kv * hd, E),
                       f"blk.{i}.attn_v.weight": (spec.n_head_kv * hd, E), f"blk.{i}.attn_output.weight": (E, E)}
        else:
            shapes |= {f"blk.{i}.ssm_in_x.weight": (d, E), f"blk.{i}.ssm_in_z.weight": (d, E),
                       f"blk.{i}.ssm_conv1d.weight": (d, k), f"blk.{i}.ssm_dt.weight": (d, d),
                       f"blk.{i}.ssm_dt.bias": (d,), f"blk.{i}.ssm_b.weight": (s, d), f"blk.{i}.ssm_c.weight": (s, d),
                       f"blk.{i}.ssm_a": (d, s), f"blk.{i}.ssm_d": (d,), f"blk.{i}.ssm_out.weight": (E, d)}
    tensors = {name: _store(w, name, _random_value(rng, name, shape), "F32") for name, shape in shapes.items()}
    _finish(w)
    return tensors


@dataclass
class Gemma3Spec:
    n_layer: int = 4
    n_embd: int = 32
    n_head: int = 4
    n_head_kv: int = 1
    head_dim: int = 16           # != n_embd / n_head, as in the real model
    n_ff: int = 64
    sliding_window: int = 4
    swa_pattern: int = 2         # layers 1, 3 global; 0, 2 sliding
    rope_base: float = 1000000.0
    rope_base_swa: float = 10000.0
    rms_eps: float = 1e-6
    seed: int = 0


def write_tiny_gemma3(path: str | Path, spec: Gemma3Spec | None = None) -> dict[str, np.ndarray]:
    spec = spec or Gemma3Spec()
    rng = np.random.default_rng(spec.seed)
    arch = "gemma3"
    w, n_vocab = _start(path, arch, "tiny-gemma3-test", spec.n_layer, 1024, spec.n_embd, spec.n_ff, spec.n_head,
                        spec.n_head_kv, spec.rope_base, spec.rms_eps)
    w.add_key_length(spec.head_dim)
    w.add_value_length(spec.head_dim)
    w.add_float32(f"{arch}.rope.freq_base_swa", spec.rope_base_swa)
    w.add_sliding_window(spec.sliding_window)
    w.add_uint32(f"{arch}.attention.sliding_window_pattern", spec.swa_pattern)
    E, hd, q, kv = spec.n_embd, spec.head_dim, spec.n_head * spec.head_dim, spec.n_head_kv * spec.head_dim
    shapes = {"token_embd.weight": (n_vocab, E), "output_norm.weight": (E,)}
    for i in range(spec.n_layer):
        shapes |= {f"blk.{i}.attn_norm.weight": (E,), f"blk.{i}.attn_q.weight": (q, E),
                   f"blk.{i}.attn_k.weight": (kv, E), f"blk.{i}.attn_v.weight": (kv, E),
                   f"blk.{i}.attn_q_norm.weight": (hd,), f"blk.{i}.attn_k_norm.weight": (hd,),
                   f"blk.{i}.attn_output.weight": (E, q), f"blk.{i}.post_attention_norm.weight": (E,),
                   f"blk.{i}.ffn_norm.weight": (E,), f"blk.{i}.ffn_gate.weight": (spec.n_ff, E),
                   f"blk.{i}.ffn_up.weight": (spec.n_ff, E), f"blk.{i}.ffn_down.weight": (E, spec.n_ff),
                   f"blk.{i}.post_ffw_norm.weight": (E,)}
    tensors = {name: _store(w, name, _random_value(rng, name, shape), "F32") for name, shape in shapes.items()}
    _finish(w)
    return tensors


# ---- running them ------------------------------------------------------------------------------------------
def logits_trace(path, backend: str, flash: bool, tokens=(5, 70, 33, 12, 99, 40, 41, 42), **ctx_kw) -> np.ndarray:
    """A 5-token prompt (all rows out: the prefill path), then one token at a time (the decode path)."""
    from kvgraph.backends import get_backend
    from kvgraph.engine.context import Context
    from kvgraph.engine.loader import load_model
    from kvgraph.graph.inputs import UBatch

    ctx = Context(load_model(path, get_backend(backend)), n_ctx=64, flash_attn=flash, **ctx_kw)
    out = [ctx.decode(UBatch.single(list(tokens[:5]), 0, all_outputs=True))]
    for i, t in enumerate(tokens[5:]):
        out.append(ctx.decode(UBatch.single([t], 5 + i)))
    return np.concatenate(out)


# name -> (writer, spec, max |logit difference| a quantized backend may have against numpy)
TINY_CASES = {
    "llama-F32": (write_tiny_llama, TinySpec(), 1e-4),
    "llama-F16": (write_tiny_llama, TinySpec(weight_type="F16"), 0.15),
    "llama-BF16": (write_tiny_llama, TinySpec(weight_type="BF16"), 0.15),
    "llama-Q8_0": (write_tiny_llama, TinySpec(weight_type="Q8_0"), 0.15),
    "llama-Q5_0": (write_tiny_llama, TinySpec(weight_type="Q5_0"), 0.15),
    "llama-Q4_0": (write_tiny_llama, TinySpec(weight_type="Q4_0"), 0.15),
    # wide enough (N multiple of 64) for q/k/v and gate/up to be stacked into one matmul each
    "llama-Q4_1-stacked": (write_tiny_llama, TinySpec(weight_type="Q4_1", n_embd=128, n_ff=256), 0.15),
    "gemma3": (write_tiny_gemma3, Gemma3Spec(), 1e-4),
    "hybrid": (write_tiny_hybrid, HybridSpec(), 1e-4),
}


def assert_tiny_case_matches_numpy(tmp_path, name: str, backend: str, flash: bool) -> None:
    """TINY_CASES[name] run on backend gives numpy's logits within the case's tolerance, with a float32 KV
    cache on both; with the backend's default float16 cache (numpy keeping the same type), within that plus
    twice what float16 storage itself changes numpy's logits by. Float16 rounds each K/V value to within half
    a unit in the last place, and where the two backends' float32 values straddle a rounding boundary
    (summation orders differ: their matmuls, numpy's BLAS per CPU) they round to neighbouring values, a full
    unit apart: at most twice the rounding that storing the cache in float16 does anyway."""
    from kvgraph.backends import get_backend

    writer, spec, atol = TINY_CASES[name]
    path = tmp_path / f"{name}.gguf"
    writer(path, spec)
    kv = get_backend(backend).cache_types[0]
    ref32 = logits_trace(path, "numpy", flash, cache_type="f32")
    diff = np.abs(logits_trace(path, backend, flash, cache_type="f32") - ref32).max()
    assert diff <= atol, f"float32 KV cache: max |diff| {diff}"
    if kv == "f16":
        ref16 = logits_trace(path, "numpy", flash, cache_type="f16")
        storage = np.abs(ref16 - ref32).max()
        diff = np.abs(logits_trace(path, backend, flash, cache_type="f16") - ref16).max()
        assert diff <= atol + 2 * storage, f"float16 KV cache: max |diff| {diff} (float16 storage: {storage})"
