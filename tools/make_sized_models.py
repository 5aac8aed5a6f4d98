"""Make random-weight GGUF models at the shapes of real models, for speed measurements (issue 23): the time a
model takes depends on its shapes and weight types, not on its weight values. Per shape, a Hugging Face model
is built from the real model's config.json values with transformers' default initialisation
(torch.manual_seed(0)), converted to float16 GGUF by llama.cpp's own convert_hf_to_gguf.py, and quantized
from that by llama.cpp's llama-quantize, both as the llama-cpp-python==0.3.36 source distribution ships them.

The tokenizer is the tiny byte-level BPE of tools/make_arch_fixtures.py (512 tokens, the pre-tokenizer of the
family, told to the converter by name); the converter pads the vocabulary up to the real vocab_size with
[PAD] tokens, so the embedding and output matrices have the real model's size. Text made with these models is
noise; only their speed means anything.

The models are large (an 8B float16 GGUF is 16 GB) and are written outside the repository, never committed:
to --out, by default $KVGRAPH_HOME/sized if KVGRAPH_HOME is set, else ~/.cache/kvgraph/sized, named
<shape>-<TYPE>.gguf (llama-3.2-1b-Q4_K_M.gguf). A file that exists is skipped unless --force; an existing
<shape>-F16.gguf is reused as the source of the quantized types. The Hugging Face model is saved to a
temporary folder inside the out folder (same disk) and deleted after conversion. One JSON line is printed
per file made.

Needs: torch (pip install torch==2.13.0), transformers==5.25.0, sentencepiece (the converter imports it), and
llama.cpp from the llama-cpp-python 0.3.36 source distribution, with llama-quantize built:

    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d /tmp/lcp
    tar xzf /tmp/lcp/llama_cpp_python-0.3.36.tar.gz -C /tmp/lcp
    cmake -S /tmp/lcp/llama_cpp_python-0.3.36/vendor/llama.cpp -B /tmp/lcp/build -DCMAKE_BUILD_TYPE=Release
    cmake --build /tmp/lcp/build --target llama-quantize -j2          # -> /tmp/lcp/build/bin/llama-quantize

    python tools/make_sized_models.py --list
    python tools/make_sized_models.py --llama-cpp /tmp/lcp/llama_cpp_python-0.3.36/vendor/llama.cpp \\
        --quantize /tmp/lcp/build/bin/llama-quantize --types Q4_K_M,Q4_0,Q8_0,F16 llama-3.2-1b qwen2.5-0.5b

Peak memory is about the float16 (bfloat16 for 8B) model once, plus the converter's working set: under 4 GB
up to 1.5B, ~8 GB for 3B, ~20 GB for 8B. Disk: the float16 GGUF plus the safetensors copy, while converting.
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_arch_fixtures as fx  # noqa: E402  (make_tokenizer, convert, ARCHS: pre-tokenizers, config patches)

SEED = 0
DEFAULT_TYPES = "Q4_K_M"
# llama-quantize types that need no importance matrix
TYPES = ["F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L",
         "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K", "IQ4_NL", "IQ4_XS"]


@dataclass
class Shape:
    arch: str                       # key of make_arch_fixtures.ARCHS: config class, pre-tokenizer, patches
    source: str                     # the real model whose config.json values these are
    vocab: int                      # the real vocab_size (padded to the arch's vocab_multiple, as converted)
    kw: dict = field(default_factory=dict)
    dtype: str = "float16"          # dtype the HF model is built and saved in
    note: str = ""


LLAMA3_ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
LLAMA = dict(rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=131072, attention_bias=False,
             mlp_bias=False, hidden_act="silu")
QWEN25 = dict(rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=32768, use_sliding_window=False,
              sliding_window=None, hidden_act="silu")

# what Granite 4.0's hybrids share: 12 attention heads over 4 KV heads (NoPE), Mamba-2 of 48 heads with state
# 128 and one group, muP-style embedding multiplier 12, tied output
GRANITE_H = dict(num_attention_heads=12, num_key_value_heads=4, mamba_n_heads=48, mamba_n_groups=1, mamba_d_state=128,
                 mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=256, mamba_conv_bias=True, mamba_proj_bias=False,
                 position_embedding_type="nope", embedding_multiplier=12.0, rms_norm_eps=1e-5, tie_word_embeddings=True)

SHAPES = {
    "qwen2.5-0.5b": Shape("qwen2", "Qwen/Qwen2.5-0.5B-Instruct", 151936, dict(
        QWEN25, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, tie_word_embeddings=True), note="0.49B"),
    "qwen2.5-1.5b": Shape("qwen2", "Qwen/Qwen2.5-1.5B-Instruct", 151936, dict(
        QWEN25, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
        num_key_value_heads=2, tie_word_embeddings=True), note="1.5B"),
    "llama-3.2-1b": Shape("llama3", "meta-llama/Llama-3.2-1B-Instruct", 128256, dict(
        LLAMA, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
        rope_scaling=dict(LLAMA3_ROPE, factor=32.0)), note="1.2B"),
    "llama-3.2-3b": Shape("llama3", "meta-llama/Llama-3.2-3B-Instruct", 128256, dict(
        LLAMA, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
        num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
        rope_scaling=dict(LLAMA3_ROPE, factor=32.0)), note="3.2B, ~8 GB RAM"),
    "llama-3.1-8b": Shape("llama3", "meta-llama/Llama-3.1-8B-Instruct", 128256, dict(
        LLAMA, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, tie_word_embeddings=False,
        rope_scaling=dict(LLAMA3_ROPE, factor=8.0)), dtype="bfloat16",
        note="8.0B, built in bfloat16: needs ~20 GB RAM and ~35 GB disk while converting"),
    # state-spaces/mamba2-130m (a mamba_ssm config: d_model 768, n_layer 24, Mamba2 defaults d_state 128,
    # d_conv 4, expand 2, headdim 64, ngroups 1, chunk_size 256; vocab 50277 padded to a multiple of 16).
    "mamba2-130m": Shape("mamba2", "state-spaces/mamba2-130m", 50277, dict(
        hidden_size=768, num_hidden_layers=24, num_heads=24, head_dim=64, expand=2, n_groups=1, state_size=128,
        conv_kernel=4, chunk_size=256, use_bias=False, use_conv_bias=True, layer_norm_epsilon=1e-5,
        tie_word_embeddings=True), dtype="float32", note="0.13B, recurrent (Mamba-2)"),
    # LiquidAI/LFM2-350M: attention at layers 2, 5, 8, 10, 12, 14, short convolutions elsewhere; block_ff_dim
    # 6656 auto-adjusted (2/3, multiple of 256) to a feed-forward width of 4608.
    "lfm2-350m": Shape("lfm2", "LiquidAI/LFM2-350M", 65536, dict(
        hidden_size=1024, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=8,
        layer_types=["full_attention" if i in (2, 5, 8, 10, 12, 14) else "conv" for i in range(16)],
        block_ff_dim=6656, block_auto_adjust_ff_dim=True, block_ffn_dim_multiplier=1.0, block_multiple_of=256,
        conv_L_cache=3, conv_bias=False, norm_eps=1e-5, rope_theta=1000000.0, max_position_embeddings=128000,
        tie_word_embeddings=True), dtype="float32", note="0.35B, hybrid (short convolutions + attention)"),
    # ibm-granite/granite-4.0-h-350m: dense (no MoE), 32 layers of which 4 attention (at 10, 13, 17, 27; NoPE),
    # the rest Mamba-2 (48 heads of 32, state 128, 1 group); shared SwiGLU MLP 2048; muP-style multipliers.
    # Values from its config.json and its GGUF metadata (residual_scale 0.246, logit_scale 3, embedding 12).
    "granite-4.0-h-350m": Shape("granitehybrid", "ibm-granite/granite-4.0-h-350m", 100352, dict(
        GRANITE_H, hidden_size=768, intermediate_size=2048, shared_intermediate_size=2048, num_hidden_layers=32,
        num_local_experts=0, num_experts_per_tok=0,
        layer_types=["attention" if i in (10, 13, 17, 27) else "mamba" for i in range(32)], mamba_d_head=32,
        residual_multiplier=0.246, attention_multiplier=0.015625, logits_scaling=3.0, max_position_embeddings=32768),
        dtype="float32", note="0.34B, hybrid (Mamba-2 + 4 attention layers of 32)"),
    # ibm-granite/granite-4.0-h-tiny at its scale (approximate: its config.json could not be read here): 40
    # layers, 4 of them attention (NoPE), the rest Mamba-2 (48 heads of 64, state 128); every layer's FFN 64
    # experts of 512 (6 per token) plus an ungated shared expert of 1024. ~7B parameters, ~1B per token.
    "granite-4.0-h-tiny": Shape("granitehybrid", "ibm-granite/granite-4.0-h-tiny (approximate)", 100352, dict(
        GRANITE_H, hidden_size=1536, intermediate_size=512, shared_intermediate_size=1024, num_hidden_layers=40,
        num_local_experts=64, num_experts_per_tok=6,
        layer_types=["attention" if i in (5, 15, 25, 35) else "mamba" for i in range(40)], mamba_d_head=64,
        residual_multiplier=0.22, attention_multiplier=0.0078125, logits_scaling=6.0, max_position_embeddings=131072),
        dtype="bfloat16", note="~7B (64-expert MoE, ~1B per token), hybrid; needs ~20 GB RAM while converting"),
    # Jamba at the scale of ai21labs/Jamba-tiny-dev (~0.3B), Jamba's own layout: attention every 8th layer
    # (offset 4), a 16-expert top-2 MoE every 2nd (offset 1), Mamba-1 with d_state 16. Widths approximate
    # that model's (its config.json could not be read here): a shape for speed, not a copy of it.
    "jamba-tiny": Shape("jamba", "ai21labs/Jamba-tiny-dev (approximate)", 65536, dict(
        hidden_size=1024, intermediate_size=2048, num_hidden_layers=16, num_attention_heads=16,
        num_key_value_heads=8, attn_layer_period=8, attn_layer_offset=4, expert_layer_period=2,
        expert_layer_offset=1, num_experts=16, num_experts_per_tok=2, mamba_d_state=16, mamba_d_conv=4,
        mamba_expand=2, mamba_dt_rank=64, rms_norm_eps=1e-6, max_position_embeddings=262144,
        tie_word_embeddings=False), dtype="float32", note="~0.4B (MoE), hybrid (Mamba-1 + attention)"),
    # Falcon-H1 at the scale of tiiuae/Falcon-H1-0.5B: every layer runs attention and Mamba-2 side by side.
    # Widths approximate (its config.json could not be read here).
    "falcon-h1-0.5b": Shape("falcon-h1", "tiiuae/Falcon-H1-0.5B (approximate)", 32784, dict(
        hidden_size=1024, intermediate_size=2048, num_hidden_layers=36, num_attention_heads=8,
        num_key_value_heads=2, head_dim=64, mamba_d_ssm=1536, mamba_n_heads=24, mamba_d_head=64,
        mamba_n_groups=1, mamba_d_state=128, mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=128,
        rms_norm_eps=1e-5, rope_theta=100000000000.0, max_position_embeddings=16384,
        tie_word_embeddings=False), dtype="float32", note="~0.5B, hybrid (parallel attention + Mamba-2)"),
    # Qwen3.5 at the scale of Qwen/Qwen3.5-0.8B (text part): 24 layers, every 4th full attention (8 heads of
    # 256, 2 KV heads, partial rotary, MRoPE sections), the rest gated delta-net (16 key and 16 value heads of
    # 128), SwiGLU 3584, tied 248k embedding. Widths approximate (its config.json could not be read here).
    "qwen3.5-0.8b": Shape("qwen35", "Qwen/Qwen3.5-0.8B (approximate)", 248320, dict(
        hidden_size=1024, intermediate_size=3584, num_hidden_layers=24, num_attention_heads=8,
        num_key_value_heads=2, head_dim=256, linear_conv_kernel_dim=4, linear_key_head_dim=128,
        linear_value_head_dim=128, linear_num_key_heads=16, linear_num_value_heads=16,
        layer_types=["full_attention" if i % 4 == 3 else "linear_attention" for i in range(24)],
        rope_parameters={"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25,
                         "mrope_section": [11, 11, 10], "mrope_interleaved": True},
        rms_norm_eps=1e-6, max_position_embeddings=262144, tie_word_embeddings=True),
        dtype="float32", note="~0.8B, hybrid (gated delta-net + gated attention)"),
}


def fail(msg: str) -> None:
    print(f"make_sized_models: error: {msg}", file=sys.stderr)
    sys.exit(2)


def default_out() -> Path:
    env = os.environ.get("KVGRAPH_HOME")        # as kvgraph.registry.model_home()
    return (Path(env).expanduser() if env else Path.home() / ".cache" / "kvgraph") / "sized"


def n_vocab(shape: Shape) -> int:
    m = fx.ARCHS[shape.arch].vocab_multiple
    return -(-shape.vocab // m) * m


def build_hf(name: str, shape: Shape, directory: Path) -> None:
    """The HF model (tokenizer, config, random weights) saved to directory."""
    import torch
    import transformers

    arch = fx.ARCHS[shape.arch]
    _, bos, eos = fx.make_tokenizer(arch.split, directory) if arch.pre else fx.make_spm_tokenizer(directory)
    torch.manual_seed(SEED)
    cfg = getattr(transformers, arch.config)(**{**arch.kw, **shape.kw, "vocab_size": n_vocab(shape),
                                                 "bos_token_id": bos, "eos_token_id": eos})
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, shape.dtype))
    with torch.no_grad():
        bad = [n for n, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    if bad:
        raise RuntimeError(f"{name}: non-finite initial weights in {bad[:5]}")
    model.save_pretrained(directory)
    del model
    gc.collect()
    fx.patch_config(arch, directory)


def report(name: str, typ: str, path: Path, t0: float) -> None:
    print(json.dumps({"shape": name, "type": typ, "path": str(path), "bytes": path.stat().st_size,
                      "seconds": round(time.perf_counter() - t0, 1)}), flush=True)


def make(name: str, types: list[str], out: Path, llama_cpp: Path, quantize: Path | None, force: bool,
         threads: int | None) -> None:
    shape = SHAPES[name]
    target = {t: out / f"{name}-{t}.gguf" for t in types}
    todo = [t for t in types if force or not target[t].exists()]
    for t in types:
        if t not in todo:
            print(f"{target[t]} exists, skipped (--force to remake)", file=sys.stderr)
    if not todo:
        return
    f16 = out / f"{name}-F16.gguf"
    with tempfile.TemporaryDirectory(dir=out, prefix=f".tmp-{name}-") as tmp:
        tmp = Path(tmp)
        if f16.exists() and not force:
            src = f16
            print(f"quantizing from the existing {f16}", file=sys.stderr)
        else:
            t0 = time.perf_counter()
            hf = tmp / "hf"
            hf.mkdir()
            build_hf(name, shape, hf)
            part = tmp / f"{name}-F16.gguf"
            fx.convert(llama_cpp, hf, part, fx.ARCHS[shape.arch].pre, f"random-{name}", outtype="f16",
                       extra=fx.ARCHS[shape.arch].convert_args)
            shutil.rmtree(hf)
            if "F16" in todo:
                os.replace(part, f16)
                src = f16
                report(name, "F16", f16, t0)
            else:
                src = part
                print(f"{name}: float16 source made in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        for t in todo:
            if t == "F16":
                continue
            t0 = time.perf_counter()
            part = tmp / target[t].name
            cmd = [str(quantize), str(src), str(part), t] + ([str(threads)] if threads else [])
            r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            if r.returncode != 0:
                print(r.stdout[-4000:], file=sys.stderr)
                raise RuntimeError(f"llama-quantize {t} of {name} failed (exit {r.returncode})")
            os.replace(part, target[t])
            report(name, t, target[t], t0)


def list_shapes() -> None:
    for name, s in SHAPES.items():
        print(f"{name:20s} {fx.ARCHS[s.arch].config:24s} vocab {n_vocab(s):6d}  {s.note}  (like {s.source})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="shapes: " + ", ".join(SHAPES))
    ap.add_argument("--llama-cpp", type=Path, help="vendor/llama.cpp of llama-cpp-python==0.3.36")
    ap.add_argument("--quantize", type=Path, help="llama-quantize built from that llama.cpp")
    ap.add_argument("--out", type=Path, default=None, help=f"output folder (default {default_out()})")
    ap.add_argument("--types", default=DEFAULT_TYPES, help=f"comma-separated (default {DEFAULT_TYPES}); "
                    f"any of {','.join(TYPES)}")
    ap.add_argument("--threads", type=int, default=None, help="llama-quantize threads (default: its own)")
    ap.add_argument("--force", action="store_true", help="remake files that exist")
    ap.add_argument("--list", action="store_true", help="print the shapes and exit")
    ap.add_argument("shapes", nargs="*", metavar="SHAPE")
    args = ap.parse_args()
    if args.list:
        list_shapes()
        return

    if not args.shapes:
        fail(f"no shape given; known shapes: {', '.join(SHAPES)}")
    unknown = [s for s in args.shapes if s not in SHAPES]
    if unknown:
        fail(f"unknown shape {', '.join(unknown)}; known shapes: {', '.join(SHAPES)}")
    types = list(dict.fromkeys(t.strip().upper() for t in args.types.split(",") if t.strip()))
    bad = [t for t in types if t not in TYPES]
    if bad or not types:
        fail(f"unknown type {', '.join(bad) or '(none)'}; known types: {', '.join(TYPES)}")
    if args.llama_cpp is None:
        fail("--llama-cpp (the vendor/llama.cpp folder of llama-cpp-python==0.3.36) is required")
    llama_cpp = args.llama_cpp.expanduser().resolve()
    if not (llama_cpp / "convert_hf_to_gguf.py").is_file() or not (llama_cpp / "gguf-py").is_dir():
        fail(f"--llama-cpp {args.llama_cpp}: no convert_hf_to_gguf.py and gguf-py there (want vendor/llama.cpp)")
    quantize = None
    if any(t != "F16" for t in types):
        if args.quantize is None:
            fail(f"--quantize (the llama-quantize binary) is required for {', '.join(t for t in types if t != 'F16')}")
        quantize = args.quantize.expanduser().resolve()
        if not quantize.is_file() or not os.access(quantize, os.X_OK):
            fail(f"--quantize {args.quantize}: not an executable file (cmake --build BUILD --target llama-quantize)")
    for mod, pip in (("torch", "torch==2.13.0"), ("transformers", "transformers==5.25.0"),
                     ("sentencepiece", "sentencepiece")):      # the converter imports it (Qwen2's set_vocab)
        if importlib.util.find_spec(mod) is None:
            fail(f"{mod} is not installed: pip install {pip}")
    import transformers

    if transformers.__version__ != "5.25.0":
        print(f"warning: written for transformers 5.25.0, this is {transformers.__version__}", file=sys.stderr)
    out = (args.out or default_out()).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        fail(f"cannot make the output folder {out}: {e}")
    for name in args.shapes:
        make(name, types, out, llama_cpp, quantize, args.force, args.threads)


if __name__ == "__main__":
    main()
