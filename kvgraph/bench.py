"""Speed measurement in llama-bench's terms: ppN (prompt processing), tgN (decode), at a context depth,
repeated after a warm-up; plus what only kvgraph can show: the host-overhead split per token (build, plan,
compile, set inputs, compute, sampling) with the graph cache on or off.

Each (model, backend, threads, flash-attn, graph-cache, test, depth) combination is one `BenchRow`.
"""
from __future__ import annotations

import os
import random
import resource
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np

from .engine.context import Context
from .graph.inputs import UBatch


@dataclass
class BenchRow:
    model_filename: str
    model_type: str
    model_size: int
    model_n_params: int
    backend: str
    n_threads: int
    n_ubatch: int
    flash_attn: bool
    cache_type: str
    graph_cache: bool
    n_prompt: int
    n_gen: int
    n_depth: int
    test: str
    n_parallel: int = 1
    kernels: str = "-"           # the C kernels' build that ran (avx512, avx2, portable), "-" without them
    samples_ns: list[int] = field(default_factory=list)
    samples_ts: list[float] = field(default_factory=list)
    avg_ns: int = 0
    stddev_ns: int = 0
    avg_ts: float = 0.0
    stddev_ts: float = 0.0
    # per processed token, averaged over the timed repetitions
    host_ms_per_token: float = 0.0
    build_ms: float = 0.0
    plan_ms: float = 0.0
    compile_ms: float = 0.0
    set_inputs_ms: float = 0.0
    compute_ms: float = 0.0
    sampling_ms: float = 0.0
    cache_hits: int = 0
    cache_misses: int = 0
    weights_mb: float = 0.0
    kv_cache_mb: float = 0.0
    compute_buffer_mb: float = 0.0
    peak_rss_mb: float = 0.0
    read_gb_s: float | None = None           # --roofline: the kernels' threads' streaming-read bandwidth
    roofline_ts: float | None = None         # tg: that bandwidth / bytes read per token (weights + KV cells)
    llama_cpp_ts: float | None = None
    llama_cpp_bench: str | None = None       # which llama-bench gave llama_cpp_ts (the fastest of --compare's)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def reset_peak_rss() -> bool:
    """Start a new peak-RSS window, so a row's peak is its own and not every earlier row's (Linux: writing
    5 to /proc/self/clear_refs resets VmHWM). False where the system cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """Peak resident memory since the last reset_peak_rss (VmHWM), else since the process started."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024     # KiB on Linux


def _tokens(n: int, vocab: int, seed: int) -> list[int]:
    # Ordinary tokens (skip the first ids, usually control tokens), reproducible per test.
    # (random, not numpy.random: importing that maps ~6 MB of extension modules into the measured process)
    rng = random.Random(seed)
    return [rng.randrange(min(100, vocab - 1), vocab) for _ in range(n)]


def _fill_depth(ctx: Context, depth: int, vocab: int) -> None:
    ctx.clear()
    toks = _tokens(depth, vocab, 1)
    for start in range(0, depth, ctx.n_ubatch):
        ctx.decode(UBatch.single(toks[start:start + ctx.n_ubatch], start))


@dataclass
class BenchTest:
    n_prompt: int
    n_gen: int
    n_depth: int

    @property
    def name(self) -> str:
        base = f"pp{self.n_prompt}" if self.n_prompt else f"tg{self.n_gen}"
        return base + (f" @ d{self.n_depth}" if self.n_depth else "")

    @property
    def n_tokens(self) -> int:
        return self.n_prompt or self.n_gen


SPLIT = ("build", "plan", "compile", "set_inputs", "compute")


@dataclass
class Sample:
    seconds: float
    sampling_s: float
    split: dict[str, float]     # engine seconds per phase during the timed section
    hits: int
    misses: int


def _snapshot(ctx: Context) -> tuple:
    st = ctx.stats
    return tuple(getattr(st, f"{k}_s") for k in SPLIT) + (st.hits, st.misses)


def run_test(ctx: Context, test: BenchTest, vocab: int) -> Sample:
    """One repetition: refill the depth (untimed), then time the test. A prompt test processes n_prompt
    tokens in ubatches and picks one token; a generation test runs n_gen single-token steps, each followed
    by a greedy pick (the sampling share of a real decode)."""
    _fill_depth(ctx, test.n_depth, vocab)
    before = _snapshot(ctx)
    sampling = 0.0
    t0 = time.perf_counter()
    if test.n_prompt:
        toks = _tokens(test.n_prompt, vocab, 2)
        for start in range(0, test.n_prompt, ctx.n_ubatch):
            logits = ctx.decode(UBatch.single(toks[start:start + ctx.n_ubatch], test.n_depth + start))
        ts = time.perf_counter()
        int(np.argmax(logits[-1]))
        sampling += time.perf_counter() - ts
    else:
        tok = _tokens(1, vocab, 3)[0]
        for i in range(test.n_gen):
            logits = ctx.decode(UBatch.single([tok], test.n_depth + i))
            ts = time.perf_counter()
            tok = int(np.argmax(logits[-1]))
            sampling += time.perf_counter() - ts
    seconds = time.perf_counter() - t0
    after = _snapshot(ctx)
    split = {k: after[i] - before[i] for i, k in enumerate(SPLIT)}
    return Sample(seconds, sampling, split, after[-2] - before[-2], after[-1] - before[-1])


def _summarize(row: BenchRow) -> None:
    """row's mean and standard deviation over its samples."""
    import statistics     # here: its modules (decimal, fractions) would weigh on the peak RSS a row reports

    row.avg_ns = int(statistics.mean(row.samples_ns))
    row.stddev_ns = int(statistics.stdev(row.samples_ns)) if len(row.samples_ns) > 1 else 0
    row.avg_ts = statistics.mean(row.samples_ts)
    row.stddev_ts = statistics.stdev(row.samples_ts) if len(row.samples_ts) > 1 else 0.0


def measure(ctx: Context, test: BenchTest, reps: int, vocab: int, row: BenchRow,
            on_rep: Callable[[], None] | None = None) -> BenchRow:
    """Warm up once, time `reps` repetitions, and fill row's timings and per-token breakdown."""
    run_test(ctx, test, vocab)   # warm-up: builds the graphs that cached repetitions replay
    samples = []
    for _ in range(reps):
        samples.append(run_test(ctx, test, vocab))
        if on_rep:
            on_rep()
    n = test.n_tokens
    row.samples_ns = [int(s.seconds * 1e9) for s in samples]
    row.samples_ts = [n / s.seconds for s in samples]
    _summarize(row)
    per_tok = 1e3 / (reps * n)
    for k in SPLIT:
        setattr(row, f"{k}_ms", sum(s.split[k] for s in samples) * per_tok)
    row.sampling_ms = sum(s.sampling_s for s in samples) * per_tok
    row.host_ms_per_token = sum(s.seconds - s.split["compute"] for s in samples) * per_tok
    row.cache_hits = sum(s.hits for s in samples)
    row.cache_misses = sum(s.misses for s in samples)
    row.kv_cache_mb = ctx.memory_bytes / 1e6
    row.compute_buffer_mb = ctx.peak_arena_bytes / 1e6
    row.peak_rss_mb = peak_rss_mb()
    return row


PARALLEL_PROMPT = 16


def measure_parallel(loaded, n_parallel: int, n_gen: int, reps: int, row: BenchRow, graph_cache: bool,
                     flash_attn: bool, cache_type: str | None = None,
                     on_rep: Callable[[], None] | None = None) -> BenchRow:
    """Aggregate decode throughput of n_parallel concurrent streams through the continuous-batching
    scheduler: each request has a 16-token prompt and generates n_gen tokens; t/s counts every stream's
    tokens over the scheduler's decode time (prefill excluded), after one warm-up round."""
    from .engine.batching import BatchScheduler, Request, scheduler_context

    per_seq = PARALLEL_PROMPT + n_gen + 1
    ctx = scheduler_context(loaded, n_parallel, per_seq, n_ubatch=row.n_ubatch, graph_cache=graph_cache,
                            flash_attn=flash_attn, cache_type=cache_type, cache_capacity=16)
    vocab = loaded.config.n_vocab

    def one_round(seed: int) -> tuple[float, int]:
        sched = BatchScheduler(ctx, loaded.tokenizer, n_parallel, per_seq, max_queue=n_parallel)
        reqs = [sched.submit(Request(_tokens(PARALLEL_PROMPT, vocab, seed + i), max_tokens=n_gen, ignore_eos=True))
                for i in range(n_parallel)]
        for r in reqs:
            r.wait()
        sched.shutdown()
        ctx.clear()
        return sched.stats.decode_seconds, sched.stats.generated_tokens_total - n_parallel  # first tokens come from prefill

    one_round(100)
    before = _snapshot(ctx)
    for rep in range(reps):
        seconds, tokens = one_round(200 + rep)
        row.samples_ns.append(int(seconds * 1e9))
        row.samples_ts.append(tokens / seconds)
        if on_rep:
            on_rep()
    after = _snapshot(ctx)
    _summarize(row)
    per_tok = 1e3 / (reps * n_parallel * max(1, n_gen - 1))
    for i, k in enumerate(SPLIT):
        setattr(row, f"{k}_ms", (after[i] - before[i]) * per_tok)
    # host share of decode time; prefill's compute is in the split too, so this is a lower bound
    row.host_ms_per_token = max(0.0, sum(row.samples_ns) / 1e9 * per_tok - row.compute_ms)
    row.cache_hits, row.cache_misses = after[-2] - before[-2], after[-1] - before[-1]
    row.kv_cache_mb = ctx.memory_bytes / 1e6
    row.peak_rss_mb = peak_rss_mb()
    return row
