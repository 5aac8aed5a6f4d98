"""The architecture fixtures of tests/data/arch (made by tools/make_arch_fixtures.py), their llama-quantize
outputs with llama.cpp's logits (tests/data/arch/quant, made by tools/make_quantized_fixtures.py), and quantized
copies of them written here with the gguf package."""
from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

ARCH_DIR = Path(__file__).resolve().parent / "data" / "arch"
FIXTURES = sorted(p.stem for p in ARCH_DIR.glob("*.gguf"))
QUANT_DIR = ARCH_DIR / "quant"
QUANT_TYPES = ("Q4_K_M", "Q8_0")
QUANTIZED = sorted(p.stem for p in QUANT_DIR.glob("*.gguf"))     # "<arch>.<type>"


def fixture(name: str) -> tuple[Path, np.ndarray, np.ndarray]:
    """(gguf path, tokens int32 [N], HF float32 logits [N, n_vocab])."""
    ref = np.load(ARCH_DIR / f"{name}.npz")
    return ARCH_DIR / f"{name}.gguf", ref["tokens"], ref["logits"]


def quantized_fixture(stem: str) -> tuple[Path, np.ndarray, np.ndarray]:
    """(llama-quantize's output, tokens int32 [N], llama.cpp's float32 logits [N, n_vocab] on that file)."""
    ref = np.load(QUANT_DIR / f"{stem}.npz")
    return QUANT_DIR / f"{stem}.gguf", ref["tokens"], ref["logits"].astype(np.float32)


def quantized_copy(src: Path, dst: Path, qtype: str | None, arch: str | None = None) -> Path:
    """src with every 2-D weight quantized to qtype (norms, biases and small constants stay f32, as
    llama.cpp's quantizer leaves them); arch: also relabel the file as another architecture."""
    r = gguf.GGUFReader(src)
    old = str(r.fields["general.architecture"].contents())
    w = gguf.GGUFWriter(dst, arch=arch or old)
    for name, f in r.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        sub = f.types[1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
        key = f"{arch}.{name[len(old) + 1:]}" if arch and name.startswith(old + ".") else name
        w.add_key_value(key, f.contents(), f.types[0], sub)
    t = gguf.GGMLQuantizationType[qtype or "F32"]
    for tensor in r.tensors:
        data = np.asarray(tensor.data)
        if qtype and data.ndim == 2 and data.shape[-1] % gguf.GGML_QUANT_SIZES[t][0] == 0:
            q = gguf.quants.quantize(data.astype(np.float32), t)
            w.add_tensor(tensor.name, q, raw_shape=q.shape, raw_dtype=t)
        else:
            w.add_tensor(tensor.name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def with_metadata(src: Path, dst: Path, key: str, value: list[int] | None) -> Path:
    """src with the array at metadata key set to value, or without the key (None); tensors as they are."""
    r = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(dst, arch=str(r.fields["general.architecture"].contents()))
    for name, f in r.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", key):
            continue
        w.add_key_value(name, f.contents(), f.types[0], f.types[1] if f.types[0] == gguf.GGUFValueType.ARRAY else None)
    if value is not None:
        w.add_array(key, value)
    for tensor in r.tensors:
        w.add_tensor(tensor.name, np.asarray(tensor.data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst
