"""`kvgraph bench` and `kvgraph perplexity` on tiny models: formats parse and carry llama-bench's fields,
every mode runs, and perplexity equals an independent formula. No timing assertions."""
from __future__ import annotations

import csv
import io
import json
import math
import stat

import numpy as np
import pytest

from kvgraph.backends import get_backend, native
from kvgraph.cli.main import main
from kvgraph.engine.context import Context
from kvgraph.engine.loader import load_model
from kvgraph.perplexity import perplexity
from test_reference_executor import direct_llama_logits
from tiny_models import TinySpec, write_tiny_llama

LLAMA_BENCH_FIELDS = ("model_filename", "model_type", "model_size", "model_n_params", "n_threads", "n_prompt",
                      "n_gen", "n_depth", "avg_ns", "stddev_ns", "avg_ts", "stddev_ts", "samples_ts")
OUR_FIELDS = ("graph_cache", "backend", "kernels", "flash_attn", "host_ms_per_token", "build_ms", "plan_ms", "compute_ms",
              "peak_rss_mb", "cache_hits", "cache_misses", "set_inputs_ms", "compile_ms", "sampling_ms",
              "weights_mb", "kv_cache_mb", "compute_buffer_mb")


def bench(capsys, path, *extra):
    rc = main(["bench", "-m", str(path), "-p", "8", "-n", "4", "-r", "2", *extra])
    out = capsys.readouterr()
    assert rc == 0, out.err
    return out.out


def test_bench_json_has_llama_bench_and_kvgraph_fields(tiny_llama, capsys):
    rows = json.loads(bench(capsys, tiny_llama[0], "-o", "json", "-d", "0,8", "--graph-cache", "on,off"))
    assert len(rows) == 2 * 2 * 2  # (pp8, tg4) x depth (0, 8) x cache (on, off)
    for r in rows:
        for f in LLAMA_BENCH_FIELDS + OUR_FIELDS:
            assert f in r, f
        assert len(r["samples_ts"]) == 2 and r["avg_ts"] > 0 and r["model_n_params"] > 0
    tests = {(r["test"], r["graph_cache"]) for r in rows}
    assert ("tg4 @ d8", False) in tests and ("pp8", True) in tests
    cached_tg = [r for r in rows if r["graph_cache"] and r["n_gen"]]
    uncached_tg = [r for r in rows if not r["graph_cache"] and r["n_gen"]]
    assert all(r["cache_misses"] == 0 and r["build_ms"] == 0 for r in cached_tg)  # warm-up built them
    assert all(r["cache_hits"] == 0 and r["build_ms"] > 0 for r in uncached_tg)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bench_rows_name_the_kernel_build_and_the_threads_that_ran(tiny_llama, capsys, monkeypatch):
    """A row says what it measured: the C kernels' build (KVGRAPH_ISA picks a lower one), "-" without them,
    and the threads used (never more than the CPUs this process may use)."""
    from kvgraph.backends import native
    from kvgraph.backends.cpus import usable_cpus

    monkeypatch.setattr(native, "_lib", native.build("portable"))
    rows = json.loads(bench(capsys, tiny_llama[0], "-o", "json", "-t", f"1,{usable_cpus() + 3}"))
    assert {(r["kernels"], r["backend"]) for r in rows} == {("portable", "native")}
    assert sorted({r["n_threads"] for r in rows}) == sorted({1, usable_cpus()})
    md = bench(capsys, tiny_llama[0], "-t", "1").splitlines()
    assert "| kernels | threads |" in md[0] and "| native | portable | 1 |" in md[2]
    numpy_rows = json.loads(bench(capsys, tiny_llama[0], "-o", "json", "--backend", "numpy"))
    assert {r["kernels"] for r in numpy_rows} == {"-"}


@pytest.mark.skipif(native.library() is None, reason="the bandwidth loop is a C kernel")
def test_bench_roofline_gives_tg_rows_the_bandwidth_bound(tiny_llama, capsys, monkeypatch):
    """--roofline: the measured read bandwidth over the bytes a decode step reads (the weights once, the KV
    cells of the context) is each tg row's bound; pp rows get none."""
    monkeypatch.setattr(native, "read_bandwidth", lambda *a, **k: 10e9)
    rows = json.loads(bench(capsys, tiny_llama[0], "-o", "json", "-d", "0,8", "--roofline"))
    tg = [r for r in rows if r["n_gen"]]
    assert all(r["roofline_ts"] is None and r["read_gb_s"] is None for r in rows if not r["n_gen"])
    for r in tg:
        assert r["read_gb_s"] == 10.0 and r["weights_mb"] > 0
        assert r["roofline_ts"] < 10e9 / (r["weights_mb"] * 1e6)         # the KV cells count too
    assert tg[0]["roofline_ts"] > tg[1]["roofline_ts"]                   # deeper: more cells read
    md = bench(capsys, tiny_llama[0], "--roofline")
    assert "| roofline t/s | of roofline |" in md.splitlines()[0] and "%" in md.splitlines()[-1]


@pytest.mark.skipif(native.library() is None, reason="the bandwidth loop is a C kernel")
def test_the_bandwidth_loop_reads_the_buffer():
    a = np.ones((1 << 20) + 3, np.uint64)
    assert native.read_bandwidth([a, a[:5]], repeats=1) > 1e8            # bytes/s; bits under 64 bytes skipped


def test_bench_progress_line_redraws_on_a_terminal_and_is_silent_elsewhere():
    from kvgraph.cli.bench_cmd import _Status

    term = _Terminal()
    with _Status(3, term) as status:
        status.update("model.gguf pp512")
        status.advance()
    lines = term.getvalue().split("\r\x1b[K")
    assert lines[1].startswith("model.gguf pp512  0/3") and lines[2].startswith("model.gguf pp512  1/3")
    assert lines[-1] == ""                      # the line is cleared at the end: results start clean
    piped = io.StringIO()
    with _Status(3, piped) as status:
        status.update("x")
        status.advance()
    assert piped.getvalue() == ""


def test_bench_jsonl_csv_and_markdown(tiny_llama, capsys):
    lines = bench(capsys, tiny_llama[0], "-o", "jsonl", "--flash-attn", "on,off").strip().splitlines()
    assert len(lines) == 4 and {json.loads(x)["flash_attn"] for x in lines} == {True, False}
    rows = list(csv.DictReader(io.StringIO(bench(capsys, tiny_llama[0], "-o", "csv"))))
    assert len(rows) == 2 and float(rows[0]["avg_ts"]) > 0 and ";" in rows[0]["samples_ns"]
    md = bench(capsys, tiny_llama[0]).splitlines()
    assert md[0].startswith("| model |") and "graph cache" in md[0] and "t/s" in md[0]
    assert len(md) == 4 and "pp8" in md[2] and "tg4" in md[3]


def test_bench_parallel_streams(tiny_llama, capsys):
    rows = json.loads(bench(capsys, tiny_llama[0], "-o", "json", "--parallel", "1,4"))
    assert [(r["test"], r["n_parallel"]) for r in rows] == [("tg4 x1", 1), ("tg4 x4", 4)]
    assert all(r["avg_ts"] > 0 and len(r["samples_ts"]) == 2 for r in rows)


def test_bench_compare_with_llama_bench(tiny_llama, capsys, tmp_path):
    fake = tmp_path / "llama-bench"
    fake.write_text("#!/usr/bin/env python3\nimport sys\na = sys.argv\np = int(a[a.index('-p') + 1]); "
                    "n = int(a[a.index('-n') + 1])\n"
                    "print('{\"n_prompt\": %d, \"n_gen\": %d, \"avg_ts\": 10.0}' % (p, n))\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    rows = json.loads(bench(capsys, tiny_llama[0], "-o", "json", "--compare", str(fake)))
    assert all(r["llama_cpp_ts"] == 10.0 for r in rows)
    md = bench(capsys, tiny_llama[0], "--compare", str(fake))
    assert "ratio" in md.splitlines()[0]


@pytest.mark.parametrize("cache_type, passed", [("f16", ["-ctk", "f16", "-ctv", "f16"]), ("f32", [])])
def test_bench_compare_passes_only_kv_types_llama_bench_takes(tiny_llama, capsys, tmp_path, cache_type, passed):
    """llama-bench has no f32 KV cache type (and refuses the argument): its default is compared there."""
    fake = tmp_path / "llama-bench"
    fake.write_text("#!/usr/bin/env python3\nimport sys, json\na = sys.argv\n"
                    "kv = [x for i, x in enumerate(a) if x in ('-ctk', '-ctv') or a[i - 1] in ('-ctk', '-ctv')]\n"
                    "assert kv == %r, kv\n"
                    "print(json.dumps({'n_prompt': int(a[a.index('-p') + 1]), 'n_gen': int(a[a.index('-n') + 1]), "
                    "'avg_ts': 10.0}))\n" % passed)
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    rows = json.loads(bench(capsys, tiny_llama[0], "-o", "json", "--cache-type", cache_type, "--compare", str(fake)))
    assert all(r["llama_cpp_ts"] == 10.0 for r in rows)


def test_bench_compare_says_when_llama_bench_crashes_and_goes_on(tiny_llama, capsys, tmp_path):
    """A llama-bench that dies of SIGILL on the prompt tests (as the AMX build does here) but runs tg."""
    fake = tmp_path / "llama-bench"
    fake.write_text("#!/usr/bin/env python3\nimport os, signal, sys\na = sys.argv\np = int(a[a.index('-p') + 1]); "
                    "n = int(a[a.index('-n') + 1])\n"
                    "if p: os.kill(os.getpid(), signal.SIGILL)\n"
                    "print('{\"n_prompt\": %d, \"n_gen\": %d, \"avg_ts\": 10.0}' % (p, n))\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    rc = main(["bench", "-m", str(tiny_llama[0]), "-p", "4", "-n", "2", "-r", "1", "-o", "json",
               "--compare", str(fake)])
    out = capsys.readouterr()
    rows = {r["test"]: r["llama_cpp_ts"] for r in json.loads(out.out)}
    assert rc == 0 and rows == {"pp4": None, "tg2": 10.0}
    assert "llama-bench crashed with SIGILL on pp4" in out.err and "-mno-amx-tile" in out.err


def test_bench_compare_takes_the_faster_of_several_llama_bench_builds(tiny_llama, capsys, tmp_path):
    """As issue 13's yardstick: per test, the faster of the builds that runs it (one crashes on prompts)."""
    def fake(name, ts, crash_on_prompts):
        f = tmp_path / name
        f.write_text("#!/usr/bin/env python3\nimport os, signal, sys\na = sys.argv\n"
                     "p = int(a[a.index('-p') + 1]); n = int(a[a.index('-n') + 1])\n"
                     f"if p and {crash_on_prompts}: os.kill(os.getpid(), signal.SIGILL)\n"
                     f"print('{{\"n_prompt\": %d, \"n_gen\": %d, \"avg_ts\": {ts}}}' % (p, n))\n")
        f.chmod(f.stat().st_mode | stat.S_IEXEC)
        return str(f)
    native, plain = fake("native-bench", 12.0, True), fake("plain-bench", 10.0, False)
    rc = main(["bench", "-m", str(tiny_llama[0]), "-p", "4", "-n", "2", "-r", "1", "-o", "json",
               "--compare", f"{native},{plain},/nonexistent/llama-bench"])
    out = capsys.readouterr()
    rows = {r["test"]: (r["llama_cpp_ts"], r["llama_cpp_bench"]) for r in json.loads(out.out)}
    assert rc == 0 and rows == {"pp4": (10.0, plain), "tg2": (12.0, native)}
    assert "not found at '/nonexistent/llama-bench'" in out.err


def test_bench_flash_attn_auto_in_a_list(tiny_llama, capsys):
    rows = json.loads(bench(capsys, tiny_llama[0], "-o", "json", "-fa", "auto,off"))
    assert len(rows) == 4 and [r["flash_attn"] for r in rows][2:] == [False, False]
    assert main(["bench", "-m", str(tiny_llama[0]), "-fa", "auto,maybe"]) != 0
    assert "expected auto/on/off values" in capsys.readouterr().err


def test_peak_rss_is_per_window():
    """bench resets the peak before each model, so a row does not report what earlier rows used."""
    from kvgraph.bench import peak_rss_mb, reset_peak_rss
    if not reset_peak_rss():
        pytest.skip("no /proc/self/clear_refs on this system")
    big = np.ones(64 << 20, np.float32)          # 256 MiB, touched
    with_big = peak_rss_mb()
    del big
    assert reset_peak_rss()
    assert peak_rss_mb() < with_big - 200


def test_bench_compare_skips_missing_binary(tiny_llama, capsys):
    rc = main(["bench", "-m", str(tiny_llama[0]), "-p", "4", "-n", "0", "-r", "1", "-o", "json",
               "--compare", "/nonexistent/llama-bench"])
    out = capsys.readouterr()
    assert rc == 0 and "not found" in out.err and json.loads(out.out)[0]["llama_cpp_ts"] is None


def test_bench_plot(tiny_llama, capsys, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "b.png"
    bench(capsys, tiny_llama[0], "-d", "0,4", "--plot", str(png))
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_bench_rejects_bad_values(tiny_llama, capsys):
    assert main(["bench", "-m", str(tiny_llama[0]), "-p", "x"]) == 1
    assert "comma-separated integers" in capsys.readouterr().err
    assert main(["bench", "-m", str(tiny_llama[0]), "--graph-cache", "maybe"]) == 1


def independent_ppl(tensors, spec, tokens, n_ctx):
    """llama-perplexity's rule computed straight from a direct float64 forward pass."""
    nll = []
    for c in range(len(tokens) // n_ctx):
        chunk = tokens[c * n_ctx:(c + 1) * n_ctx]
        logits = direct_llama_logits(tensors, spec, chunk)
        for j in range(n_ctx // 2, n_ctx - 1):
            z = logits[j] - logits[j].max()
            nll.append(-(z[chunk[j + 1]] - math.log(np.exp(z).sum())))
    return math.exp(float(np.mean(nll)))


@pytest.fixture(scope="module")
def ppl_model(tmp_path_factory):
    spec = TinySpec(seed=3)
    path = tmp_path_factory.mktemp("ppl") / "m.gguf"
    tensors = write_tiny_llama(path, spec)
    tokens = [int(t) for t in np.random.default_rng(7).integers(3, 260, 100)]
    return path, tensors, spec, tokens


def test_perplexity_equals_independent_formula_within_0_1_percent(ppl_model):
    path, tensors, spec, tokens = ppl_model
    loaded = load_model(path, get_backend("numpy"))
    result = perplexity(Context(loaded, n_ctx=32, n_ubatch=16), loaded.tokenizer, tokens, 32)
    ref = independent_ppl(tensors, spec, tokens, 32)
    assert result.n_chunks == 3 and result.n_scored == 3 * 15
    assert abs(result.ppl / ref - 1) < 1e-3
    assert len(result.running) == 3 and result.ppl_err > 0


def test_perplexity_cli_save_logits_and_kl_divergence(ppl_model, capsys, tmp_path):
    path, _, _, tokens = ppl_model
    from kvgraph.tokenizer import Tokenizer  # noqa: F401  (text round-trips through the byte-level vocab)
    text_file = tmp_path / "t.txt"
    text_file.write_text("the cat sat on the mat and then the dog ran in the sun " * 6)
    base = tmp_path / "base.npz"
    assert main(["perplexity", "-m", str(path), "-f", str(text_file), "-c", "32", "--save-logits", str(base)]) == 0
    out = capsys.readouterr().out
    assert "Final estimate: PPL = " in out and base.exists()
    assert main(["perplexity", "-m", str(path), "-f", str(text_file), "-c", "32", "--json",
                 "--kl-divergence", str(base), "--flash-attn", "on"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["kl"]["top1_agreement"] == 1.0 and result["kl"]["mean_kld"] < 1e-6
    assert result["kl"]["max_abs_dlogit"] < 1e-3


def test_perplexity_errors(ppl_model, capsys, tmp_path):
    path = ppl_model[0]
    short = tmp_path / "s.txt"
    short.write_text("hi")
    assert main(["perplexity", "-m", str(path), "-f", str(short), "-c", "32"]) == 1
    assert "needs at least 32" in capsys.readouterr().err
    assert main(["perplexity", "-m", str(path), "-f", str(tmp_path / "missing.txt")]) == 1
    assert "cannot read" in capsys.readouterr().err
