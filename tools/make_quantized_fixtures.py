"""Make the quantized architecture fixtures under tests/data/arch/quant/: each float32 fixture
tests/data/arch/<arch>.gguf (tools/make_arch_fixtures.py) quantized by llama.cpp's own `llama-quantize` to
Q4_K_M and Q8_0, and llama.cpp's own logits on that file for the token sequence of the fixture's .npz. The
tests judge kvgraph's logits on these files against llama.cpp's (tests/test_quantized_fixtures.py), as the
float32 fixtures are judged against Hugging Face.

The files are what llama-quantize writes, kept as they are: tensor dimensions without ggml's trailing ones
(Granite hybrid's ssm_norm is 1-D), norms and other small tensors left in F32, and for each tensor it cannot
quantize to the type asked the type it falls back to (at hidden size 64 no row divides Q4_K's 256-element
blocks, so a "Q4_K_M" fixture holds Q5_0 / Q8_0 / Q5_1 matrices, as real files hold for their odd tensors;
the K-quants themselves are covered by the real Gemma3 Q4_K_M model).

llama.cpp's logits: the whole sequence in one batch (n_batch = n_ubatch = n_ctx-sized), logits for every
token, a float32 KV cache, flash attention off, 2 threads, through libllama's C API (the sdist's own ctypes
bindings, llama_cpp/llama_cpp.py, loaded without the package's __init__, which needs the server's extras).

Needs, offline from the tests: the llama-cpp-python==0.3.36 source distribution and llama.cpp built from
its vendor/llama.cpp as shared libraries (the C and C++ compilers and cmake; no Python packages beyond
numpy and typing_extensions):

    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d /tmp/lcp
    tar xzf /tmp/lcp/llama_cpp_python-0.3.36.tar.gz -C /tmp/lcp
    cmake -S /tmp/lcp/llama_cpp_python-0.3.36/vendor/llama.cpp -B /tmp/lcp/build -DCMAKE_BUILD_TYPE=Release \\
          -DBUILD_SHARED_LIBS=ON -DGGML_NATIVE=ON -DLLAMA_CURL=OFF
    cmake --build /tmp/lcp/build --target llama-quantize llama -j2
    python tools/make_quantized_fixtures.py --sdist /tmp/lcp/llama_cpp_python-0.3.36 --bin /tmp/lcp/build/bin [ARCH ...]

Each fixture is quant/<arch>.<TYPE>.gguf and quant/<arch>.<TYPE>.npz: tokens int32 [N] (the float fixture's),
logits float16 [N, n_vocab] (llama.cpp's float32 logits rounded to float16 to halve what the repository
carries: at most 2e-3 off for these |logits| < 8, far below the tolerance the tests use; the script prints the
largest rounding), and the settings as strings.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import numpy as np

ARCH_DIR = Path(__file__).resolve().parents[1] / "tests" / "data" / "arch"
OUT = ARCH_DIR / "quant"
QTYPES = ("Q4_K_M", "Q8_0")
THREADS = 2
# llama.cpp sets Phi-3's special-token attributes by the model's name (llama-vocab.cpp: a general.name holding
# "phi3" must have an "<|endoftext|>" token, which the tiny SentencePiece vocabulary lacks), so llama.cpp is
# told another name when it loads that file (a load-time override; the file stays llama-quantize's output).
NAME_AT_LOAD = {"phi3": "kvgraph-tiny-p3"}


def quantize(bin_dir: Path, src: Path, dst: Path, qtype: str) -> None:
    """llama-quantize src dst qtype (its log kept out of sight unless it fails)."""
    run = subprocess.run([str(bin_dir / "llama-quantize"), str(src), str(dst), qtype, str(THREADS)],
                         capture_output=True, text=True)
    if run.returncode:
        sys.exit(f"llama-quantize failed on {src.name} ({qtype}):\n{run.stdout[-3000:]}{run.stderr[-3000:]}")


def bindings(sdist: Path, bin_dir: Path):
    """The sdist's ctypes bindings (llama_cpp/llama_cpp.py) over bin_dir's libllama.so: the package's
    __init__ also imports the high-level API (diskcache, jinja2, ...), so the module is imported under an
    empty package object instead. LLAMA_CPP_LIB_PATH is where the bindings look for libllama."""
    os.environ["LLAMA_CPP_LIB_PATH"] = str(bin_dir)
    pkg = types.ModuleType("llama_cpp")
    pkg.__path__ = [str(sdist / "llama_cpp")]
    sys.modules["llama_cpp"] = pkg
    import llama_cpp.llama_cpp as llama

    llama._kvgraph_quiet = llama.llama_log_callback(lambda level, text, user: None)   # kept alive here
    llama.llama_log_set(llama._kvgraph_quiet, None)
    llama.llama_backend_init()
    return llama


def llama_logits(llama, path: Path, tokens: np.ndarray, name: str | None = None) -> np.ndarray:
    """llama.cpp's logits [N, n_vocab] for tokens, evaluated as one batch with every token an output; name:
    the general.name llama.cpp is told instead of the file's."""
    n = len(tokens)
    mp = llama.llama_model_default_params()
    mp.n_gpu_layers = 0
    if name is not None:
        overrides = (llama.llama_model_kv_override * 2)()      # ends with an empty key
        overrides[0].tag, overrides[0].key = llama.LLAMA_KV_OVERRIDE_TYPE_STR, b"general.name"
        overrides[0].value.val_str = name.encode()
        mp.kv_overrides = overrides
    model = llama.llama_model_load_from_file(str(path).encode(), mp)
    if not model:
        sys.exit(f"llama.cpp cannot load {path}")
    cp = llama.llama_context_default_params()
    cp.n_ctx = max(512, n)
    cp.n_batch = cp.n_ubatch = n
    cp.n_seq_max = 1
    cp.type_k = cp.type_v = 0                                        # GGML_TYPE_F32
    cp.flash_attn_type = llama.LLAMA_FLASH_ATTN_TYPE_DISABLED
    cp.n_threads = cp.n_threads_batch = THREADS
    ctx = llama.llama_init_from_model(model, cp)
    if not ctx:
        sys.exit(f"llama.cpp cannot make a context for {path}")
    batch = llama.llama_batch_init(n, 0, 1)
    try:
        for i, t in enumerate(tokens):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = int(t), i, 1, 1
            batch.seq_id[i][0] = 0
        batch.n_tokens = n
        if llama.llama_decode(ctx, batch) != 0:
            sys.exit(f"llama_decode failed on {path}")
        n_vocab = llama.llama_vocab_n_tokens(llama.llama_model_get_vocab(model))
        return np.ctypeslib.as_array(llama.llama_get_logits(ctx), shape=(n, n_vocab)).astype(np.float32)
    finally:
        llama.llama_batch_free(batch)
        llama.llama_free(ctx)
        llama.llama_model_free(model)


def make(llama, bin_dir: Path, name: str, qtype: str) -> dict:
    OUT.mkdir(parents=True, exist_ok=True)
    src, dst = ARCH_DIR / f"{name}.gguf", OUT / f"{name}.{qtype}.gguf"
    quantize(bin_dir, src, dst, qtype)
    tokens = np.load(ARCH_DIR / f"{name}.npz")["tokens"].astype(np.int32)
    logits = llama_logits(llama, dst, tokens, NAME_AT_LOAD.get(name))
    stored = logits.astype(np.float16)
    np.savez_compressed(OUT / f"{name}.{qtype}.npz", tokens=tokens, logits=stored,
                        settings=np.array(f"llama.cpp (llama-cpp-python 0.3.36 sdist), one batch of {len(tokens)}, "
                                          f"all logits, KV cache F32, flash attention off, {THREADS} threads"))
    return {"fixture": dst.name, "gguf_bytes": dst.stat().st_size,
            "npz_bytes": (OUT / f"{name}.{qtype}.npz").stat().st_size,
            "float16_rounding": float(np.abs(stored.astype(np.float32) - logits).max())}


# Qwen3.5's rope sections where llama.cpp leaves rotary pairs unrotated for text (their e position is 0; every
# real file's sections cover the pairs): the qwen35 fixture relabelled with each, llama.cpp's float32 logits on
# the float32 file for the first IMROPE_TOKENS tokens, stored as quant/qwen35.imrope.npz (float32: the tests hold
# these to the float fixtures' 1e-4).
IMROPE_SECTIONS = ([3, 0, 0, 0], [0, 0, 1, 0])
IMROPE_TOKENS = 24


def make_imrope(llama, tmp: Path) -> dict:
    sys.path.insert(0, str(ARCH_DIR.parents[1]))          # tests/: the relabelling the tests use
    from arch_fixtures import with_metadata

    tokens = np.load(ARCH_DIR / "qwen35.npz")["tokens"][:IMROPE_TOKENS].astype(np.int32)
    logits = []
    for sections in IMROPE_SECTIONS:
        path = with_metadata(ARCH_DIR / "qwen35.gguf", tmp / "qwen35.imrope.gguf", "qwen35.rope.dimension_sections",
                             sections)
        logits.append(llama_logits(llama, path, tokens))
    np.savez_compressed(OUT / "qwen35.imrope.npz", tokens=tokens, sections=np.array(IMROPE_SECTIONS, np.int32),
                        logits=np.stack(logits))
    return {"fixture": "qwen35.imrope.npz", "npz_bytes": (OUT / "qwen35.imrope.npz").stat().st_size}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sdist", type=Path, required=True, help="the unpacked llama-cpp-python 0.3.36 sdist")
    ap.add_argument("--bin", type=Path, required=True, help="llama.cpp's build bin/ (llama-quantize, libllama.so)")
    ap.add_argument("--types", default=",".join(QTYPES), help=f"default: {','.join(QTYPES)}")
    ap.add_argument("--imrope", action="store_true", help="only quant/qwen35.imrope.npz (IMROPE_SECTIONS)")
    ap.add_argument("archs", nargs="*", help="default: every tests/data/arch/*.gguf")
    args = ap.parse_args()
    llama = bindings(args.sdist, args.bin)
    if args.imrope:
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(make_imrope(llama, Path(tmp))))
        return
    for name in args.archs or sorted(p.stem for p in ARCH_DIR.glob("*.gguf")):
        for qtype in args.types.split(","):
            print(json.dumps(make(llama, args.bin, name, qtype)), flush=True)


if __name__ == "__main__":
    main()
