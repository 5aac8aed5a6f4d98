"""`kvgraph bench`: llama-bench's vocabulary and output, plus graph-cache and host-overhead columns.

Results go to stdout (md, json, jsonl or csv); progress goes to stderr, so `-o json > file` is clean.
"""
from __future__ import annotations

import csv
import io
import json
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np

from ..errors import InvalidArgumentError, KvgraphError

OUTPUTS = ("md", "json", "jsonl", "csv")


def _int_list(flag: str, text: str, minimum: int = 0) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip() != ""]
    except ValueError:
        raise InvalidArgumentError(f"{flag}: expected comma-separated integers, got {text!r}.") from None
    if any(v < minimum for v in values):
        raise InvalidArgumentError(f"{flag}: values must be >= {minimum}, got {text!r}.")
    return values


def _on_off_list(flag: str, text: str, auto: bool = False) -> list[bool | None]:
    """on/off values, comma-separated; with auto, 'auto' too (None: the backend's choice)."""
    out = []
    for v in text.split(","):
        v = v.strip().lower()
        if auto and v == "auto":
            out.append(None)
        elif v in ("on", "1", "true", "yes"):
            out.append(True)
        elif v in ("off", "0", "false", "no"):
            out.append(False)
        else:
            raise InvalidArgumentError(f"{flag}: expected {'auto/' if auto else ''}on/off values, got {text!r}.")
    return out


def add_bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="llama-bench style speed test (pp/tg t/s, host overhead, memory)",
                       description="Measure prompt processing (ppN) and generation (tgN) speed. Comma lists "
                                   "multiply: every combination is one row.")
    p.add_argument("-m", "--model", default=None, help="GGUF paths or known names, comma-separated (default smollm2-135m)")
    p.add_argument("-p", "--n-prompt", default="512", help="prompt lengths, e.g. 128,512 (default 512; 0 skips)")
    p.add_argument("-n", "--n-gen", default="128", help="generation lengths (default 128; 0 skips)")
    p.add_argument("-d", "--n-depth", default="0", help="context depth before each test (default 0)")
    p.add_argument("-r", "--repetitions", type=int, default=5, help="timed repetitions after a warm-up (default 5)")
    p.add_argument("-t", "--threads", default=None, help="thread counts (default: physical cores)")
    p.add_argument("--backend", default=None, help="backends, comma-separated (default: the default backend)")
    p.add_argument("--graph-cache", default="on", help="on, off or on,off (default on)")
    p.add_argument("--flash-attn", "-fa", default="auto",
                   help="on, off, auto or a list such as on,off (default auto: on where the backend has a fused "
                        "kernel, i.e. torch and native)")
    p.add_argument("--cache-type", "-ctk", "-ctv", choices=("auto", "f16", "f32", "q8_0"), default="auto",
                   help="KV cache storage, K and V (default auto: the backend's, f16 where the C kernels run "
                        "attention); --compare passes it to llama-bench as -ctk / -ctv")
    p.add_argument("--parallel", default=None,
                   help="concurrent streams, e.g. 1,2,4,8: measure aggregate decode t/s through continuous "
                        "batching for each -n (replaces the pp/tg tests)")
    p.add_argument("--ubatch", type=int, default=512, help="prompt tokens per graph run (default 512)")
    p.add_argument("-o", "--output", choices=OUTPUTS, default="md", help="output format (default md)")
    p.add_argument("--compare", metavar="LLAMA_BENCH", default=None,
                   help="path to llama.cpp's llama-bench (or several, comma-separated: the faster per test "
                        "counts): run it on the same file and tests, interleaved, and add a ratio column")
    p.add_argument("--roofline", action="store_true",
                   help="after each tg row, time the kernels' threads streaming through the model's weights "
                        "(native backend) and give the row the t/s that read speed allows (weights and KV "
                        "cells read once per token)")
    p.add_argument("--plot", metavar="FILE.png", default=None, help="plot t/s against depth (needs matplotlib)")
    p.set_defaults(func=cmd_bench)


def _model_type(info) -> str:
    """llama-bench's model label, e.g. "llama 135M Q4_1"."""
    from ..gguf.types import FILE_TYPES

    ftype = info.get("general.file_type")
    ftype_name = "?" if ftype is None else FILE_TYPES.get(ftype, str(ftype))
    return f"{info.get('general.architecture', '?')} {info.get('general.size_label') or '?'} {ftype_name}"


def _llama_bench(binary: str, model_path: str, test, reps: int, threads: int, flash_attn: bool, cache_type: str,
                 err) -> float | None:
    """avg t/s llama-bench reports for the same test, or None (with a note on stderr) when it fails."""
    # llama-bench takes no f32 KV cache type (f16, bf16, q8_0, ...): there, and for a model without a KV cache
    # (whose states kvgraph reports as f32), its default is compared
    kv = ["-ctk", cache_type, "-ctv", cache_type] if cache_type != "f32" else []
    cmd = [binary, "-m", model_path, "-r", str(reps), "-t", str(threads), "-fa", "1" if flash_attn else "0", *kv,
           "-p", str(test.n_prompt), "-n", str(test.n_gen), "-d", str(test.n_depth), "-o", "jsonl"]
    import subprocess

    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        print(f"--compare: llama-bench failed to run ({exc}); no ratio for {test.name}", file=err)
        return None
    for line in proc.stdout.splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("n_prompt") == test.n_prompt and row.get("n_gen") == test.n_gen:
            return float(row["avg_ts"])
    if proc.returncode < 0:
        try:
            how = f"crashed with {signal.Signals(-proc.returncode).name}"
        except ValueError:
            how = f"was killed by signal {-proc.returncode}"
        hint = (" SIGILL: that build uses instructions this CPU does not run (AMX on these machines: build it "
                "with -mno-amx-tile -mno-amx-int8 -mno-amx-bf16)." if proc.returncode == -signal.SIGILL else "")
        print(f"--compare: llama-bench {how} on {test.name}; no ratio for it (going on with the other "
              f"tests).{hint}", file=err)
        return None
    print(f"--compare: llama-bench gave no result for {test.name} (exit {proc.returncode}): "
          f"{(proc.stderr.strip().splitlines() or [''])[-1]}", file=err)
    return None


class _Status:
    """The bench's progress line on stderr (what runs, steps done / total, seconds so far), redrawn in place
    on a terminal and silent otherwise. Not rich's live display: the bench reports its own process's peak
    memory, which rich's modules and refresh thread would raise by ~3.5 MB in every row."""

    def __init__(self, total: int, stream=None):
        self.stream = stream or sys.stderr
        self.total, self.done, self.what = total, 0, "bench"
        self.live = self.stream.isatty()
        self.t0 = time.monotonic()

    def __enter__(self) -> _Status:
        return self

    def __exit__(self, *exc) -> None:
        if self.live:
            self.stream.write("\r\x1b[K")
            self.stream.flush()

    def update(self, what: str) -> None:
        self.what = what
        self._draw()

    def advance(self) -> None:
        self.done += 1
        self._draw()

    def _draw(self) -> None:
        if self.live:
            line = f"{self.what}  {self.done}/{self.total}  {time.monotonic() - self.t0:.0f} s"
            self.stream.write("\r\x1b[K" + line[:shutil.get_terminal_size().columns - 1])
            self.stream.flush()


def cmd_bench(args) -> int:
    from ..api import LLM
    import gc as gc_module

    from ..backends.cpus import kernel_threads
    from ..bench import BenchRow, BenchTest, measure, reset_peak_rss
    from ..registry import resolve_model

    err = sys.stderr
    prompts = [p for p in _int_list("-p", args.n_prompt) if p > 0]
    gens = [n for n in _int_list("-n", args.n_gen) if n > 0]
    depths = _int_list("-d", args.n_depth)
    threads = _int_list("-t", args.threads, 1) if args.threads else [kernel_threads()]
    if args.repetitions < 1:
        raise InvalidArgumentError(f"-r must be >= 1, got {args.repetitions}.")
    if not prompts and not gens:
        raise InvalidArgumentError("nothing to measure: give -p and/or -n values above 0.")
    caches = _on_off_list("--graph-cache", args.graph_cache)
    fas = _on_off_list("--flash-attn", args.flash_attn, auto=True)
    backends = [b.strip() for b in args.backend.split(",")] if args.backend else [None]
    models = [m.strip() for m in args.model.split(",")] if args.model else [None]
    tests = [BenchTest(p, 0, d) for d in depths for p in prompts] + [BenchTest(0, n, d) for d in depths for n in gens]
    parallel = _int_list("--parallel", args.parallel, 1) if args.parallel else []
    if parallel:
        if not gens:
            raise InvalidArgumentError("--parallel measures generation: give -n.")
        tests = [BenchTest(0, n, 0) for n in gens]
    compare = []
    for binary in (b.strip() for b in (args.compare or "").split(",") if b.strip()):
        if Path(binary).is_file() or shutil.which(binary):
            compare.append(binary)
        else:
            print(f"--compare: llama-bench not found at {binary!r}; skipping it.", file=err)

    rows: list[BenchRow] = []
    total = (len(models) * len(backends) * len(threads) * len(fas) * len(caches) * len(tests) * (args.repetitions + 1)
             * max(1, len(parallel)))
    with _Status(total) as progress:
        for model in models:
            path = resolve_model(model, progress=True)
            for backend in backends:
                for n_threads in threads:
                    for fa in fas:
                        for gc in caches:
                            n_ctx = max(depths) + max(prompts + gens) + 1
                            gc_module.collect()             # the previous rows' model is gone: a new peak window
                            reset_peak_rss()
                            llm = LLM(str(path), n_ctx=n_ctx, n_ubatch=args.ubatch, backend=backend, threads=n_threads,
                                      graph_cache=gc, flash_attn=fa,
                                      cache_type=None if args.cache_type == "auto" else args.cache_type,
                                      tokenizer=False)
                            fa_used = llm.ctx.flash_attn         # auto resolved: rows and llama-bench use it
                            used_threads = getattr(llm.loaded.backend, "n_threads", None) or n_threads  # capped
                            kv_type = llm.ctx.cache_type
                            meta = llm.loaded.file.metadata
                            for test in tests:
                                progress.update(f"{Path(path).name} {llm.loaded.backend.name} "
                                                f"t={used_threads} fa={'on' if fa_used else 'off'} "
                                                f"cache={'on' if gc else 'off'} {test.name}")
                                row = BenchRow(
                                    model_filename=str(path), model_type=_model_type(meta),
                                    model_size=llm.loaded.file.file_size,
                                    model_n_params=sum(t.n_elements for t in llm.loaded.file.tensors.values()),
                                    backend=llm.loaded.backend.name, kernels=_kernels(llm.loaded.backend),
                                    n_threads=used_threads, n_ubatch=args.ubatch,
                                    flash_attn=fa_used, cache_type=kv_type, graph_cache=gc, n_prompt=test.n_prompt,
                                    n_gen=test.n_gen,
                                    n_depth=test.n_depth, test=test.name,
                                    weights_mb=llm.loaded.backend.weights_nbytes(llm.loaded.weights) / 1e6)
                                if parallel:
                                    rows.extend(_parallel_rows(llm, row, test, parallel, args, gc, fa_used, progress))
                                    continue
                                with llm.loaded.backend.threads(used_threads):
                                    measure(llm.ctx, test, args.repetitions, llm.loaded.config.n_vocab, row,
                                            on_rep=progress.advance)
                                progress.advance()
                                if args.roofline and test.n_gen:
                                    _roofline(row, llm, test, err)
                                if compare:
                                    progress.update(f"llama-bench {test.name}")
                                    runs = [(ts, b) for b in compare
                                            if (ts := _llama_bench(b, str(path), test, args.repetitions, used_threads,
                                                                   fa_used, kv_type, err)) is not None]
                                    if runs:               # the faster build that ran it is the reference
                                        row.llama_cpp_ts, row.llama_cpp_bench = max(runs)
                                rows.append(row)
                            del llm
    sys.stdout.write(render(rows, args.output))
    sys.stdout.flush()
    if args.plot:
        plot(rows, args.plot)
        print(f"plot written to {args.plot}", file=err)
    return 0


def _roofline(row, llm, test, err) -> None:
    """row.read_gb_s and row.roofline_ts, right after the row's test: the speed the kernels' threads stream-
    read the model's own weight arrays at (the bytes a decode step reads, where they lie) and the t/s that
    gives with the KV cells of the context (on average depth + n_gen / 2 of them) read at the same speed;
    of a mixture's experts, only the share a token uses (n_expert_used of n_expert). The C kernels' backend
    only."""
    from ..backends import native

    if row.backend != "native":
        print(f"--roofline: only for the native backend; none for {row.backend}", file=err)
        return
    arrays = {}
    for w in llm.loaded.weights.values():
        for a in (getattr(w.mat, "tiles", None), getattr(w.mat, "w", None), w.dense):
            if isinstance(a, np.ndarray) and a.size:
                arrays.setdefault(a.ctypes.data, a)
    with llm.loaded.backend.threads(row.n_threads):
        bw = native.read_bandwidth(list(arrays.values()))
    kv_per_cell = llm.ctx.memory_bytes / llm.ctx.n_ctx
    extra = llm.loaded.config.extra
    idle = 1 - extra.get("n_expert_used", 0) / max(extra.get("n_expert", 0), 1)   # a mixture reads its chosen experts
    experts = sum(w.nbytes for w in llm.loaded.weights.values() if len(w.shape) == 3)
    per_token = row.weights_mb * 1e6 - experts * idle + kv_per_cell * (test.n_depth + test.n_gen / 2)
    row.read_gb_s, row.roofline_ts = bw / 1e9, bw / per_token


def _kernels(backend) -> str:
    """Which build of the C kernels a backend runs ("-": none)."""
    if not getattr(backend, "native", False):
        return "-"
    from ..backends import native

    return native.isa_of(native.library())


def _parallel_rows(llm, template, test, parallel, args, gc, fa, progress):
    from dataclasses import replace

    from ..bench import measure_parallel

    out = []
    for n_par in parallel:
        row = replace(template, n_parallel=n_par, test=f"tg{test.n_gen} x{n_par}", samples_ns=[], samples_ts=[])
        progress.update(f"{row.model_type} {row.backend} cache={'on' if gc else 'off'} {row.test}")
        with llm.loaded.backend.threads(row.n_threads):
            measure_parallel(llm.loaded, n_par, test.n_gen, args.repetitions, row, gc, fa, llm.ctx.cache_type,
                             on_rep=progress.advance)
        progress.advance()
        out.append(row)
    return out


def render(rows, fmt: str) -> str:
    dicts = [r.as_dict() for r in rows]
    if fmt == "json":
        return json.dumps(dicts, indent=2) + "\n"
    if fmt == "jsonl":
        return "".join(json.dumps(d) + "\n" for d in dicts)
    if fmt == "csv":
        buf = io.StringIO()
        if dicts:
            writer = csv.DictWriter(buf, fieldnames=list(dicts[0]))
            writer.writeheader()
            for d in dicts:
                writer.writerow({k: ";".join(map(str, v)) if isinstance(v, list) else v for k, v in d.items()})
        return buf.getvalue()
    return render_markdown(rows)


def render_markdown(rows) -> str:
    compare = any(r.llama_cpp_ts is not None for r in rows)
    head = ["model", "size", "params", "backend", "kernels", "threads", "fa", "kv", "graph cache", "test", "t/s",
            "host ms/tok", "build+plan+compile ms/tok", "peak RSS MiB"]
    roofline = any(r.roofline_ts is not None for r in rows)
    if roofline:
        head += ["read GB/s", "roofline t/s", "of roofline"]
    if compare:
        head += ["llama.cpp t/s", "ratio"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---:" if i >= 5 else "---" for i in range(len(head))) + "|"]
    for r in rows:
        cells = [r.model_type, f"{r.model_size / 2**20:.2f} MiB", f"{r.model_n_params / 1e6:.2f} M", r.backend,
                 r.kernels, str(r.n_threads), "on" if r.flash_attn else "off", r.cache_type, "on" if r.graph_cache else "off", r.test,
                 f"{r.avg_ts:.2f} ± {r.stddev_ts:.2f}", f"{r.host_ms_per_token:.3f}",
                 f"{r.build_ms + r.plan_ms + r.compile_ms:.3f}", f"{r.peak_rss_mb:.0f}"]
        if roofline:
            cells += [f"{r.read_gb_s:.1f}", f"{r.roofline_ts:.2f}", f"{r.avg_ts / r.roofline_ts:.0%}"] \
                if r.roofline_ts else ["-", "-", "-"]
        if compare:
            cells += [f"{r.llama_cpp_ts:.2f}" if r.llama_cpp_ts else "-",
                      f"{r.avg_ts / r.llama_cpp_ts:.2f}" if r.llama_cpp_ts else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows, path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise KvgraphError("--plot needs matplotlib: pip install 'kvgraph[plot]'.") from None
    series: dict[tuple, list[tuple[int, float, float]]] = {}
    for r in rows:
        name = (r.test.split(" @")[0], r.backend, r.flash_attn, r.graph_cache)
        series.setdefault(name, []).append((r.n_depth, r.avg_ts, r.stddev_ts))
    fig, ax = plt.subplots(figsize=(8, 5))
    for (test, backend, fa, gc), pts in sorted(series.items()):
        pts.sort()
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", capsize=3,
                    linestyle="-" if gc else "--",
                    label=f"{test} {backend}{' fa' if fa else ''} cache {'on' if gc else 'off'}")
    ax.set_xlabel("context depth (tokens)")
    ax.set_ylabel("tokens / s")
    ax.set_title("kvgraph bench")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
