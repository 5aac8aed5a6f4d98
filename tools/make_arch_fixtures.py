"""Make the architecture fixtures under tests/data/arch/: per architecture, a tiny randomly initialised
Hugging Face model, converted to GGUF by llama.cpp's own convert_hf_to_gguf.py, and HF's float32 logits for
a fixed token sequence. The test suite reads only the outputs (it needs neither transformers nor the
converter); this script is how they were made and how to make them again.

Needs, offline from the tests: torch (pip install torch==2.13.0), transformers==5.25.0, and llama.cpp's
converter as the llama-cpp-python==0.3.36 source distribution ships it:

    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d /tmp/lcp
    tar xzf /tmp/lcp/llama_cpp_python-0.3.36.tar.gz -C /tmp/lcp
    python tools/make_arch_fixtures.py --llama-cpp /tmp/lcp/llama_cpp_python-0.3.36/vendor/llama.cpp [ARCH ...]

Each fixture is <arch>.gguf (f32 weights) and <arch>.npz (tokens int32 [N], logits float32 [N, n_vocab]).
Weights are drawn with a larger spread than transformers' init, and norms and biases are randomised too,
so that a missing bias or norm shows in the logits. The tokenizer is a byte-level BPE trained here on a
fixed text, with the pre-tokenizer of the family it stands for (the converter recognises tokenizers by a
checksum of their output, so the script tells it the pre-tokenizer name instead), or, for the SentencePiece
families, a SentencePiece BPE model with byte fallback trained on the same text.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "arch"
N_TOKENS = 300            # crosses the KV cache's 256-cell padding when decoded token by token
VOCAB = 512
SEED = 0

QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
CORPUS = """The cat sat on the mat. A quick brown fox jumps over the lazy dog; 0123456789 and 3.14159.
Once upon a time, in a land far away, there lived a small model with a tiny vocabulary.
Ask not what your graph can do for you -- ask what you can cache for your graph!
"It's the end," she said, "and we'll see what they've done." Numbers: 12, 345, 6789, 101112.
Unicode: café, naïve, Ünïcödé, 日本語, привет, 🙂. Code: def f(x): return x ** 2 + 1
"""
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-6, rope_theta=10000.0)


@dataclass
class Arch:
    config: str                     # transformers config class
    pre: str | None                 # byte-level BPE: tokenizer.ggml.pre the converter is told; None: SentencePiece
    split: str = ""                 # BPE: the pre-tokenizer regex the HF tokenizer uses
    kw: dict = field(default_factory=dict)
    vocab_multiple: int = 1         # the vocabulary padded as the converter pads it (Mamba, Granite: 8; Mamba-2: 16)
    config_patch: dict = field(default_factory=dict)   # config.json values renamed for the converter
    convert_args: tuple = ()        # more convert_hf_to_gguf.py arguments
    init: dict = field(default_factory=dict)  # parameter name ending -> (mean, std) of its values, drawn instead


ARCHS = {
    "qwen2": Arch("Qwen2Config", "qwen2", QWEN2_SPLIT, dict(tie_word_embeddings=False)),
    "qwen3": Arch("Qwen3Config", "qwen2", QWEN2_SPLIT, dict(head_dim=32, tie_word_embeddings=True)),
    # Qwen3's MoE models (Qwen3-30B-A3B, Qwen3-Coder-30B-A3B): every layer's FFN a mixture of experts (experts
    # drawn smaller, as Qwen3-Next's: a near tie one int8 rounding flips changes every later layer's routing)
    "qwen3moe": Arch("Qwen3MoeConfig", "qwen2", QWEN2_SPLIT, dict(
        head_dim=32, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True,
        decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=False),
        init={"experts.gate_up_proj": (0.0, 0.06), "experts.down_proj": (0.0, 0.06)}),
    "llama3": Arch("LlamaConfig", "llama-bpe", LLAMA3_SPLIT, dict(
        rope_theta=500000.0, tie_word_embeddings=False, max_position_embeddings=131072,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64})),
    "mistral": Arch("MistralConfig", None, kw=dict(sliding_window=None, tie_word_embeddings=False)),
    "phi3": Arch("Phi3Config", None, kw=dict(pad_token_id=0, sliding_window=None, original_max_position_embeddings=1024,
                                             tie_word_embeddings=False)),
    "gemma2": Arch("Gemma2Config", None, kw=dict(
        head_dim=16, query_pre_attn_scalar=16, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
        sliding_window=32, hidden_activation="gelu_pytorch_tanh", pad_token_id=0, tie_word_embeddings=True)),
    "mamba": Arch("MambaConfig", "gpt-2", GPT2_SPLIT, dict(
        state_size=16, expand=2, conv_kernel=4, time_step_rank=4, use_bias=False, use_conv_bias=True,
        layer_norm_epsilon=1e-5, tie_word_embeddings=True), vocab_multiple=8),
    # A GGUF holds one RMS epsilon, which llama.cpp (and kvgraph) also use for Falcon-Mamba's dt/B/C norms;
    # HF uses mixer_rms_eps there (1e-6 by default), so the fixture sets both alike.
    "falcon-mamba": Arch("FalconMambaConfig", "gpt-2", GPT2_SPLIT, dict(
        state_size=16, expand=2, conv_kernel=4, time_step_rank=4, use_bias=False, use_conv_bias=True,
        layer_norm_epsilon=1e-5, mixer_rms_eps=1e-5, tie_word_embeddings=False), vocab_multiple=8),
    "mamba2": Arch("Mamba2Config", "gpt-2", GPT2_SPLIT, dict(
        num_heads=8, head_dim=16, expand=2, n_groups=2, state_size=16, conv_kernel=4, use_bias=False,
        use_conv_bias=True, layer_norm_epsilon=1e-5, chunk_size=64, tie_word_embeddings=False), vocab_multiple=16),
    "jamba": Arch("JambaConfig", None, kw=dict(
        num_hidden_layers=4, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1,
        num_experts=4, num_experts_per_tok=2, mamba_d_state=16, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=8,
        mamba_conv_bias=True, mamba_proj_bias=False, use_mamba_kernels=False, tie_word_embeddings=False)),
    "falcon-h1": Arch("FalconH1Config", "gpt-2", GPT2_SPLIT, dict(
        head_dim=16, mamba_d_ssm=128, mamba_n_heads=8, mamba_d_head=16, mamba_n_groups=1, mamba_d_state=16,
        mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=64, mamba_conv_bias=True, mamba_proj_bias=False,
        mamba_rms_norm=False, projectors_bias=False, tie_word_embeddings=False)),
    "granitehybrid": Arch("GraniteMoeHybridConfig", "gpt-2", GPT2_SPLIT, dict(
        shared_intermediate_size=128, num_local_experts=0, num_experts_per_tok=0, layer_types=["mamba", "attention"],
        mamba_n_heads=8, mamba_d_head=16, mamba_n_groups=1, mamba_d_state=16, mamba_d_conv=4, mamba_expand=2,
        mamba_chunk_size=64, mamba_conv_bias=True, mamba_proj_bias=False, position_embedding_type="nope",
        embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.3, logits_scaling=1.5,
        tie_word_embeddings=False),
        vocab_multiple=8, config_patch={"full_attention": "attention", "linear_attention": "mamba"}),
    # Granite 4.0's mixture-of-experts hybrids (H-Tiny, H-Small): every layer's FFN is experts plus an
    # ungated shared expert (shared_mlp, the converter's ffn_*_shexp)
    "granitehybrid-moe": Arch("GraniteMoeHybridConfig", "gpt-2", GPT2_SPLIT, dict(
        intermediate_size=32, shared_intermediate_size=48, num_local_experts=4, num_experts_per_tok=2,
        layer_types=["mamba", "attention", "mamba"], num_hidden_layers=3,
        mamba_n_heads=8, mamba_d_head=16, mamba_n_groups=1, mamba_d_state=16, mamba_d_conv=4, mamba_expand=2,
        mamba_chunk_size=64, mamba_conv_bias=True, mamba_proj_bias=False, position_embedding_type="nope",
        embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.3, logits_scaling=1.5,
        tie_word_embeddings=False),
        vocab_multiple=8, config_patch={"full_attention": "attention", "linear_attention": "mamba"}),
    "lfm2": Arch("Lfm2Config", "gpt-2", GPT2_SPLIT, dict(
        layer_types=["conv", "full_attention"], conv_L_cache=3, conv_bias=False, block_auto_adjust_ff_dim=False,
        block_ff_dim=128, norm_eps=1e-5, rope_theta=1000000.0, tie_word_embeddings=True)),
    # Gated DeltaNet layers with attention every second layer; more value heads than key heads (each key head
    # serves two), partial rotary, and every layer a mixture of experts with a gated shared expert. Its norms
    # are 1 + weight (the converter stores 1 + w), so those weights are drawn around 0, not 1. The experts are
    # drawn smaller: with random weights a near tie in one layer's router that a rounding flips changes
    # later layers' routing in turn (every layer is a mixture here), and at the usual spread one int8
    # rounding of the activations moved the argmax at 24% of the positions (at 5-7% with these).
    "qwen3next": Arch("Qwen3NextConfig", "qwen2", QWEN2_SPLIT, dict(
        num_hidden_layers=4, full_attention_interval=2, head_dim=32, linear_conv_kernel_dim=4,
        linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
        num_experts=4, num_experts_per_tok=2, norm_topk_prob=True, moe_intermediate_size=32,
        shared_expert_intermediate_size=48,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
        tie_word_embeddings=False),
        # The converter expects Qwen3-Next's multi-token-prediction block, which transformers' model does not have.
        convert_args=("--no-mtp",),
        init={"layernorm.weight": (0.0, 0.2), "q_norm.weight": (0.0, 0.2), "k_norm.weight": (0.0, 0.2),
              "model.norm.weight": (0.0, 0.2), "experts.gate_up_proj": (0.0, 0.06), "experts.down_proj": (0.0, 0.06)}),
    # Qwen3.5: Qwen3-Next's blocks with separate beta / alpha projections, the value heads tiled by the
    # converter (two key heads, four value heads, so the order matters), interleaved MRoPE sections that
    # cover the 4 rotary pairs (text positions: plain NEOX rope), a dense FFN, tied output. Attention at
    # layers 1 and 2 (an irregular pattern, read from attention.recurrent_layers).
    "qwen35": Arch("Qwen3_5TextConfig", "qwen2", QWEN2_SPLIT, dict(
        num_hidden_layers=4, head_dim=32, linear_conv_kernel_dim=4, linear_key_head_dim=16,
        linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
        layer_types=["linear_attention", "full_attention", "full_attention", "linear_attention"],
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25,
                         "mrope_section": [2, 1, 1], "mrope_interleaved": True},
        tie_word_embeddings=True),
        convert_args=("--no-mtp",),     # no multi-token-prediction block in transformers' model
        init={"layernorm.weight": (0.0, 0.2), "q_norm.weight": (0.0, 0.2), "k_norm.weight": (0.0, 0.2),
              "model.norm.weight": (0.0, 0.2)}),
    # Qwen3.5-MoE: the same trunk (attention every second layer) with Qwen3-Next's experts and gated shared
    # expert in every layer, an untied output; the experts drawn smaller as Qwen3-Next's are.
    "qwen35moe": Arch("Qwen3_5MoeTextConfig", "qwen2", QWEN2_SPLIT, dict(
        num_hidden_layers=4, full_attention_interval=2, head_dim=32, linear_conv_kernel_dim=4,
        linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25,
                         "mrope_section": [2, 1, 1], "mrope_interleaved": True},
        tie_word_embeddings=False),
        convert_args=("--no-mtp",),
        init={"layernorm.weight": (0.0, 0.2), "q_norm.weight": (0.0, 0.2), "k_norm.weight": (0.0, 0.2),
              "model.norm.weight": (0.0, 0.2), "experts.gate_up_proj": (0.0, 0.06), "experts.down_proj": (0.0, 0.06)}),
}


def make_spm_tokenizer(directory: Path) -> tuple[int, int, int]:
    """A SentencePiece BPE model with byte fallback (the llama/mistral/phi3/gemma kind): tokenizer.model; the
    token count and the bos and eos ids."""
    import io

    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS.splitlines() * 4), model_writer=model, vocab_size=VOCAB, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        hard_vocab_limit=False, add_dummy_prefix=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, minloglevel=2)
    (directory / "tokenizer.model").write_bytes(model.getvalue())
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
         "add_bos_token": True}))
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    return sp.vocab_size(), sp.bos_id(), sp.eos_id()


def make_tokenizer(split: str, directory: Path) -> tuple[int, int, int]:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - len(SPECIALS), special_tokens=[],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([CORPUS] * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIALS[0], eos_token=SPECIALS[2],
                                   unk_token=None, pad_token=SPECIALS[0])
    fast.add_special_tokens({"additional_special_tokens": SPECIALS[1:]})
    fast.chat_template = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + "
                          "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                          "{% endif %}")
    fast.save_pretrained(directory)
    return len(fast), fast.bos_token_id, fast.eos_token_id


def make_model(arch: Arch, vocab: tuple[int, int, int], directory: Path):
    import torch
    import transformers

    torch.manual_seed(SEED)
    n_vocab, bos, eos = vocab
    cfg = getattr(transformers, arch.config)(**{**BASE, **arch.kw, "vocab_size": n_vocab, "bos_token_id": bos,
                                                 "eos_token_id": eos})
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            special = [v for k, v in arch.init.items() if name.endswith(k)]
            if special:
                p.normal_(*special[0])
            elif "norm" in name:
                p.normal_(1.0, 0.2)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.2)
            else:
                p.normal_(0.0, 0.1)
    model.eval()
    model.save_pretrained(directory)
    patch_config(arch, directory)
    return model


def patch_config(arch: Arch, directory: Path) -> None:
    """Rename the saved config.json's list values the converter knows by other names (e.g. Granite hybrid's
    layer_types)."""
    if not arch.config_patch:
        return
    path = directory / "config.json"
    cfg_json = json.loads(path.read_text())
    for key, value in cfg_json.items():
        if isinstance(value, list):
            cfg_json[key] = [arch.config_patch.get(v, v) if isinstance(v, str) else v for v in value]
    path.write_text(json.dumps(cfg_json))


def convert(llama_cpp: Path, model_dir: Path, out: Path, pre: str | None, name: str, outtype: str = "f32",
            extra: tuple = ()) -> None:
    """Run llama.cpp's convert_hf_to_gguf.py in this process, telling it the pre-tokenizer by name; outtype is
    the converter's --outtype (f32 for the fixtures; f16, bf16, q8_0 also); extra: more of its arguments."""
    sys.path[:0] = [str(llama_cpp / "gguf-py"), str(llama_cpp)]
    for mod in [m for m in sys.modules if m == "gguf" or m.startswith("gguf.")]:
        del sys.modules[mod]           # the converter must use the gguf-py it ships with
    conv = importlib.import_module("convert_hf_to_gguf")
    base = importlib.import_module("conversion.base")
    if pre is not None:
        base.TextModel.get_vocab_base_pre = lambda self, tokenizer: pre
    argv = sys.argv
    sys.argv = ["convert_hf_to_gguf.py", str(model_dir), "--outfile", str(out), "--outtype", outtype,
                "--model-name", f"kvgraph-tiny-{name}", *extra]
    try:
        conv.main()
    finally:
        sys.argv = argv


def make(name: str, llama_cpp: Path) -> dict:
    import torch

    arch = ARCHS[name]
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        n_tokens, bos, eos = make_tokenizer(arch.split, d) if arch.pre else make_spm_tokenizer(d)
        n_vocab = -(-n_tokens // arch.vocab_multiple) * arch.vocab_multiple
        model = make_model(arch, (n_vocab, bos, eos), d)
        convert(llama_cpp, d, OUT / f"{name}.gguf", arch.pre, name, extra=arch.convert_args)
    tokens = np.random.default_rng(SEED).integers(0, n_tokens, N_TOKENS).astype(np.int32)
    with torch.no_grad():
        logits = model(torch.from_numpy(tokens.astype(np.int64))[None]).logits[0].float().numpy()
    np.savez_compressed(OUT / f"{name}.npz", tokens=tokens, logits=logits.astype(np.float32))
    return {"arch": name, "config": arch.config, "n_vocab": n_vocab, "gguf_bytes": (OUT / f"{name}.gguf").stat().st_size}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llama-cpp", type=Path, required=True, help="vendor/llama.cpp of llama-cpp-python==0.3.36")
    ap.add_argument("archs", nargs="*", help=f"default: all ({', '.join(ARCHS)})")
    args = ap.parse_args()
    import transformers

    if transformers.__version__ != "5.25.0":
        print(f"warning: made with transformers 5.25.0, this is {transformers.__version__}", file=sys.stderr)
    for name in args.archs or ARCHS:
        print(json.dumps(make(name, args.llama_cpp)))


if __name__ == "__main__":
    main()
