"""File -> validated config, model, tokenizer and backend weights."""
from __future__ import annotations

import dataclasses
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import GGUFError, InsufficientMemoryError, UnsupportedModelError
from ..gguf.config import MetadataView, ModelConfig, read_config
from ..gguf.reader import GGUFFile, same_shape
from ..gguf.types import dequantize
from ..models import ARCHITECTURES, Model, architecture
from .heap import available_bytes, release_free_heap


@dataclass
class LoadedModel:
    path: Path
    file: GGUFFile
    config: ModelConfig
    model: Model
    backend: Any
    weights: dict[str, Any]
    load_seconds: float
    _tokenizer: Any = dataclasses.field(default=None, repr=False)
    _tokenizer_lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)

    @property
    def tokenizer(self):
        """The file's tokenizer, built on first use (a benchmark, which feeds token ids, never pays for it)."""
        return self._tokenizer if self._tokenizer is not None else self.load_tokenizer()

    def load_tokenizer(self):
        with self._tokenizer_lock:
            if self._tokenizer is None:
                from ..tokenizer import Tokenizer

                self._tokenizer = Tokenizer.from_metadata(self.file.metadata)
        return self._tokenizer


def open_model(path: str | os.PathLike[str]) -> tuple[GGUFFile, ModelConfig, Model]:
    """Read and validate a file against its architecture's expected tensors (no weights loaded)."""
    gf = GGUFFile(path)
    arch = gf.architecture
    if arch not in ARCHITECTURES:
        raise UnsupportedModelError(
            f"{gf.path}: architecture {arch!r} is not supported; kvgraph runs: "
            f"{', '.join(sorted(ARCHITECTURES))}.")
    cfg = read_config(gf.metadata, arch, str(gf.path))
    cls = architecture(arch)
    cfg = dataclasses.replace(cfg, extra=cls.read_extra(MetadataView(gf.metadata, arch, str(gf.path))))
    cfg = dataclasses.replace(cfg, extra=cfg.extra | cls.read_layout(cfg, frozenset(gf.tensors)))
    model = cls(cfg)
    constants = _read_constants(gf, model)
    if constants:
        model = cls(dataclasses.replace(cfg, extra={**cfg.extra, **constants}))
        cfg = model.cfg
    derived = model.derived_tensors()
    _split_fused(gf, derived)
    used = set(model.shapes) | set(model.constant_shapes()) | {src for src, _, _ in derived.values()}
    unused = sorted(name for name in set(gf.tensors) - used if not name.startswith(model.skipped_tensors()))
    if unused:
        # As llama.cpp refuses a file with an unexpected tensor count: a tensor that kvgraph would ignore
        # may change the computation (llama3's rope_freqs once did), so running without it is not an option.
        raise UnsupportedModelError(
            f"{gf.path}: {len(unused)} tensor(s) that kvgraph's {arch} does not use ({', '.join(unused[:3])}"
            f"{', ...' if len(unused) > 3 else ''}); running without them would compute something else, so the "
            "file is refused.")
    for name, shape in model.shapes.items():
        info = gf.tensor(name)
        if info is None:
            if name in model.optional_tensors:
                continue
            raise GGUFError(f"{gf.path}: tensor {name!r} is missing; the {arch} architecture needs it "
                            "(incomplete or wrongly converted file).")
        if not same_shape(info.shape, shape):
            raise GGUFError(f"{gf.path}: tensor {name!r} has shape {info.shape} but the hyper-parameters "
                            f"say {shape}; the file is inconsistent.")
        if tuple(info.shape) != tuple(shape):
            # written without ggml's trailing dimensions of one (llama-quantize's output): every backend
            # reads the tensor (gf.tensor) with the shape the architecture names
            gf.add_view(info.reshaped(shape))
    return gf, model.cfg, model


def _split_fused(gf: GGUFFile, derived: dict[str, tuple[str, int, int]]) -> None:
    """Present each fused file tensor as the parts the architecture names (views, no copies)."""
    for name, (src, start, n) in derived.items():
        info = gf.tensors.get(src)
        if info is None:
            raise GGUFError(f"{gf.path}: tensor {src!r} is missing; the {gf.architecture} architecture needs it "
                            "(incomplete or wrongly converted file).")
        if len(info.shape) != 2 or start + n > info.shape[0]:
            raise GGUFError(f"{gf.path}: tensor {src!r} has shape {info.shape}, too small to hold {name!r} (rows "
                            f"{start}..{start + n}); the file is inconsistent.")
        gf.add_view(info.row_range(name, start, n))


def _read_constants(gf: GGUFFile, model: Model) -> dict[str, tuple[float, ...]]:
    out = {}
    for name, shape in model.constant_shapes().items():
        info = gf.tensors.get(name)
        if info is None:
            continue
        if not same_shape(info.shape, shape):
            raise GGUFError(f"{gf.path}: tensor {name!r} has shape {info.shape} but the hyper-parameters say "
                            f"{shape}; the file is inconsistent.")
        with np.errstate(all="ignore"):       # non-finite values are refused just below
            values = dequantize(np.asarray(info.data), info.type_name)
        if not np.isfinite(values).all():
            raise GGUFError(f"{gf.path}: tensor {name!r} holds non-finite values; the file is corrupt.")
        out[name] = tuple(float(v) for v in np.ravel(values))
    return out


MEMORY_HEADROOM = 1.05      # the weights, plus what Python, the tokenizer and the first buffers take


def _check_memory(gf: GGUFFile, model: Model, backend: Any) -> None:
    """Refuse, before loading, a model whose weights the host cannot hold (one line, not an OOM kill)."""
    need = backend.weight_bytes(gf, model.shapes) * MEMORY_HEADROOM
    have = available_bytes()
    if have is not None and need > have:
        raise InsufficientMemoryError(
            f"{gf.path}: its weights need about {need / 1e9:.1f} GB of memory on the {backend.name} backend, but "
            f"only {have / 1e9:.1f} GB is available (free and reclaimable memory, within any cgroup limit). Use "
            "a smaller or more quantized file, free memory, or the native backend (the numpy backend keeps "
            "float32 weights).")


def load_model(path: str | os.PathLike[str], backend: Any, *, tokenizer: bool = True) -> LoadedModel:
    """The model at path with its weights in backend's form; tokenizer=False leaves the tokenizer to be
    built on first use (a tokenizer error then surfaces there rather than here)."""
    t0 = time.perf_counter()
    gf, cfg, model = open_model(path)
    loaded = LoadedModel(Path(path), gf, cfg, model, backend, {}, 0.0)
    if tokenizer:
        loaded.load_tokenizer()    # before the weights: a broken vocabulary fails before the slow part
    weights = loaded.weights
    _check_memory(gf, model, backend)
    backend.start_load(gf)
    # Without floating-point warnings: a corrupt file's numbers (a changed tensor type id makes scales of
    # other bytes) overflow as they are dequantized and repacked; what they compute is refused downstream
    # (non-finite logits) with one message, not preceded by numpy's lines.
    with np.errstate(all="ignore"):
        for name in model.shapes:
            if gf.tensor(name) is not None:
                weights[name] = backend.load_weight(gf, name)
        # Tied output: reuse the embedding rather than a second copy.
        for name in model.optional_tensors:
            if name not in weights and name == "output.weight":
                weights[name] = backend.tie_output(weights["token_embd.weight"])
        backend.finish_load()
    gf.release_resident()     # pages the repacking read (and their neighbours) no longer count as ours
    release_free_heap()       # and the repacking's freed temporaries
    loaded.load_seconds = time.perf_counter() - t0
    return loaded
