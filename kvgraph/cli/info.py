"""`kvgraph info`: what a GGUF file holds, without loading its weights."""
from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path
from typing import Any


def model_info(path: str | Path) -> dict[str, Any]:
    from ..backends.native.mats import runs_as
    from ..engine.loader import open_model
    from ..models import ARCHITECTURES
    from ..tokenizer import Tokenizer

    gf, cfg, model = open_model(path)
    tok = Tokenizer.from_metadata(gf.metadata)
    types: Counter = Counter()
    type_bytes: Counter = Counter()
    for t in gf.tensors.values():
        types[t.type_name] += 1
        type_bytes[t.type_name] += t.n_bytes
    hparams = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("extra", "name", "arch")}
    for k, v in cfg.extra.items():  # architecture-specific: sliding window layout, recurrent sizes, ...
        if k == "swa_layers":
            k, v = "global_attention_layers", [i for i, swa in enumerate(v) if not swa]
        hparams[k] = v
    return {
        "path": str(gf.path),
        "name": cfg.name,
        "architecture": cfg.arch,
        "file_size": gf.file_size,
        "gguf_version": gf.version,
        "n_params": sum(t.n_elements for t in gf.tensors.values()),
        "n_tensors": len(gf.tensors),
        "tensor_types": {k: {"count": types[k], "bytes": type_bytes[k], "runs_as": runs_as(k)} for k in sorted(types)},
        "hyperparameters": hparams,
        "tied_output": "output.weight" not in gf.tensors,
        "tokenizer": {
            "model": tok.model_kind, "pre": tok.pre, "vocab_size": tok.vocab_size, "bos_id": tok.bos_id,
            "eos_id": tok.eos_id, "eog_ids": sorted(tok.eog_ids), "add_bos": tok.add_bos,
            "chat_template": tok.chat_template_source,
        },
        "supported_architectures": sorted(ARCHITECTURES),
    }


def render_info(info: dict[str, Any]) -> None:
    from rich.table import Table

    from .main import stdout_console

    console = stdout_console()
    console.print(f"[bold]{info['name']}[/bold]  ({info['path']})")
    console.print(f"architecture {info['architecture']}, GGUF v{info['gguf_version']}, "
                  f"{info['file_size'] / 1e6:.1f} MB, {info['n_params'] / 1e6:.1f} M parameters, "
                  f"{info['n_tensors']} tensors{', output tied to token embedding' if info['tied_output'] else ''}")
    hp = Table(title="hyper-parameters", show_header=False)
    for k, v in info["hyperparameters"].items():
        if v not in (None, (), []):
            hp.add_row(k, str(v))
    console.print(hp)
    tt = Table(title="tensor types")
    for col in ("type", "tensors", "MB", "matrices run as (native backend)"):
        tt.add_column(col)
    for name, d in info["tensor_types"].items():
        tt.add_row(name, str(d["count"]), f"{d['bytes'] / 1e6:.1f}", d["runs_as"])
    console.print(tt)
    tk = info["tokenizer"]
    console.print(f"tokenizer: {tk['model']} (pre: {tk['pre']}), vocab {tk['vocab_size']}, bos {tk['bos_id']} "
                  f"(added: {tk['add_bos']}), eos {tk['eos_id']}, end-of-generation {tk['eog_ids']}, "
                  f"chat template: {tk['chat_template']}")
    console.print(f"kvgraph runs: {', '.join(info['supported_architectures'])}")
