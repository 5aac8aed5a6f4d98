"""The GGUF format's value types and ggml tensor types (id -> name, block size, block bytes).

These are the format's fixed numbers, the same as the `gguf` package's `GGUFValueType`, `GGMLQuantizationType`,
`GGML_QUANT_SIZES` and `LlamaFileType` (a test checks that they agree). Opening a file needs only these, and importing `gguf`
costs ~30 ms and ~4 MB at every start, so the package is imported only for what it computes (dequantizing,
or naming a tensor type newer than this table).
"""
from __future__ import annotations

# GGUF metadata value types
UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64, FLOAT64 = range(13)

# ggml type id -> (name, elements per block, bytes per block)
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40), 10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98), 19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110), 22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56), 30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17),
}  # fmt: skip

# general.file_type -> name (llama.cpp's llama_ftype, "MOSTLY_" dropped)
FILE_TYPES: dict[int, str] = {
    0: "ALL_F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K", 11: "Q3_K_S",
    12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K",
    19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL",
    26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S", 29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16", 36: "TQ1_0",
    37: "TQ2_0", 38: "MXFP4_MOE",
}  # fmt: skip


def ggml_type(type_id: int) -> tuple[str, int, int] | None:
    """(name, block, block bytes) of a ggml type id; None for an id neither this table nor gguf knows."""
    known = GGML_TYPES.get(type_id)
    if known is not None:
        return known
    import gguf     # a type newer than this table

    try:
        q = gguf.GGMLQuantizationType(type_id)
    except ValueError:
        return None
    size = gguf.GGML_QUANT_SIZES.get(q)
    return (q.name, *size) if size else None


def dequantize(data, type_name: str):
    """gguf's dequantizer for a tensor type (float32 values, numpy shape)."""
    import gguf

    return gguf.quants.dequantize(data, gguf.GGMLQuantizationType[type_name])
