#!/usr/bin/env python3
"""Run llama.cpp's own server test suite against `kvgraph serve` (and llama-server when built); print the table.

    python tools/llama_server_suite.py --llama-cpp DIR [--llama-server PATH] [--model GGUF] [-k EXPR]

DIR is a llama.cpp source tree, e.g. the llama-cpp-python 0.3.36 sdist's `vendor/llama.cpp`:

    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 && tar xzf llama_cpp_python-0.3.36.tar.gz

The suite's servers download their models from Hugging Face; nothing may here, so a shim stands in for the
llama-server binary: it replaces the model flags (--hf-repo, --hf-file, -mu, --offline) by `-m MODEL` (one
local model for every test, SmolLM2-135M by default) and passes every other flag through unchanged, to
`kvgraph serve` or to the real llama-server. kvgraph therefore sees llama-server's command lines as they are;
a flag it does not know fails the test, as it would fail a user. Both targets run the same model, so the
tests whose expected text was written for the suite's own models (stories260K) fail on both and do not count.

The score is kvgraph's passes among the tests llama-server passes, less the tests of llama.cpp internals
listed in EXCLUDED (each with its reason; docs/compatibility.md gives the same list). Not part of the default
test run: it takes ~10 minutes and needs the llama.cpp source tree.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FILES = ("test_basic", "test_completion", "test_chat_completion", "test_tokenize", "test_ctx_shift",
         "test_ignore_eos", "test_metrics", "test_security", "test_template", "test_stream")

# Tests of llama.cpp internals another engine need not copy: test-name prefix -> reason.
EXCLUDED = {
    "test_metrics.py::": "llama.cpp's own `llamacpp:*` metric names and its `Process-Start-Time-Unix` header "
                         "(kvgraph's metrics are `kvgraph_*`)",
    "test_ignore_eos.py::": "how llama.cpp implements ignore_eos (end-of-generation tokens listed as logit biases "
                            "in generation_settings)",
    "test_security.py::test_cors_proxy": "`/cors-proxy`, the bundled web UI's fetch proxy",
    "test_security.py::test_cors_origins_defaults_to_localhost_with_tools_enabled": "llama-server's built-in "
                                                                                     "agent tools (`--tools`)",
    "test_stream.py::": "the router's `/v1/stream` resumable streams of `--models-dir` servers",
}

SHIM = r'''#!{python}
"""llama-server's command line with the model flags replaced by one local model; see llama_server_suite.py."""
import os, sys
args, out, skip = sys.argv[1:], [], 0
for i, a in enumerate(args):
    if skip:
        skip -= 1
        continue
    if a in ("--hf-repo", "-hf", "-hfr", "--hf-file", "-hff", "--model-url", "-mu", "-m", "--model"):
        skip = 1
    elif a != "--offline":
        out.append(a)
out = ["-m", os.environ["SUITE_MODEL"]] + out
target = os.environ["SUITE_TARGET"]
if target == "kvgraph":
    os.execv(sys.executable, [sys.executable, "-m", "kvgraph.cli.main", "serve"] + out)
os.execv(target, [target] + out)
'''

PLUGIN = '''
"""Loaded with -p. The suite's session fixture would start every preset server once to download its model: not
here. Its responses keep headers in a plain dict, so a lower-case name (as HTTP/1.1 servers built on h11 or
uvicorn send, and as HTTP allows: names are case-insensitive) fails `"Access-Control-Allow-Origin" in headers`:
the headers become a case-insensitive dict."""
import functools
import requests.structures
import utils
utils.ServerPreset.load_all = staticmethod(lambda: None)
_make_request = utils.ServerProcess.make_request


@functools.wraps(_make_request)
def make_request(self, *args, **kwargs):
    res = _make_request(self, *args, **kwargs)
    res.headers = requests.structures.CaseInsensitiveDict(res.headers)
    return res


utils.ServerProcess.make_request = make_request
'''


def default_model() -> str:
    sys.path.insert(0, str(REPO))
    from kvgraph.registry import resolve_model
    return str(resolve_model("smollm2-135m"))


def prepare(llama_cpp: Path, work: Path, python: str) -> Path:
    """A copy of the suite with the paths it reaches by `../../../` (templates, test images)."""
    src = llama_cpp / "tools" / "server" / "tests"
    if not (src / "utils.py").is_file():
        raise SystemExit(f"error: {src} holds no llama.cpp server tests; give --llama-cpp a llama.cpp source tree")
    root = work / "llama.cpp"
    shutil.copytree(src, root / "tools" / "server" / "tests", ignore=shutil.ignore_patterns("tmp", "__pycache__"))
    shutil.copytree(llama_cpp / "models" / "templates", root / "models" / "templates")
    if (llama_cpp / "tools" / "mtmd").is_dir():
        shutil.copytree(llama_cpp / "tools" / "mtmd", root / "tools" / "mtmd",
                        ignore=lambda d, names: [n for n in names if not n.endswith((".jpeg", ".jpg", ".png"))])
    tests = root / "tools" / "server" / "tests"
    (tests / "kvgraph_suite_plugin.py").write_text(PLUGIN)
    shim = work / "llama-server-shim"
    shim.write_text(SHIM.replace("{python}", python))
    shim.chmod(0o755)
    return tests


def run_suite(tests: Path, shim: Path, target: str, model: str, files, extra, log: Path) -> dict[str, str]:
    """{test id: passed|failed|skipped} for one target."""
    xml = tests / f"results-{Path(target).name}.xml"
    env = {**os.environ, "LLAMA_SERVER_BIN_PATH": str(shim), "SUITE_TARGET": target, "SUITE_MODEL": model,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "pytest", "-p", "kvgraph_suite_plugin", "-q", "-o", "addopts=",
           "-p", "no:cacheprovider", f"--junitxml={xml}", *[f"unit/{f}.py" for f in files], *extra]
    print(f"running the suite against {target} (log: {log})", flush=True)
    with open(log, "w") as out:
        subprocess.run(cmd, cwd=tests, env=env, stdout=out, stderr=subprocess.STDOUT)
    results = {}
    for case in ET.parse(xml).iter("testcase"):
        name = f"{case.get('classname', '').split('.')[-1]}.py::{case.get('name')}"
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed"
            elif child.tag == "skipped":
                outcome = "skipped"
        results[name] = outcome
    return results


def excluded(name: str) -> str | None:
    return next((why for prefix, why in EXCLUDED.items() if name.startswith(prefix)), None)


def table(kv: dict, ll: dict | None) -> dict:
    rows, total = [], {"tests": 0, "llama": 0, "kvgraph": 0, "both": 0, "counted": 0, "counted_kv": 0}
    for f in FILES:
        names = [n for n in kv if n.startswith(f + ".py::")]
        row = {"file": f, "tests": len(names), "kvgraph": sum(kv[n] == "passed" for n in names)}
        if ll is not None:
            base = [n for n in names if ll.get(n) == "passed"]
            counted = [n for n in base if not excluded(n)]
            row.update(llama=len(base), both=sum(kv[n] == "passed" for n in base), counted=len(counted),
                       counted_kv=sum(kv[n] == "passed" for n in counted))
        rows.append(row)
        for k in total:
            total[k] += row.get(k, 0)
    total["file"] = "all"
    return {"rows": rows, "total": total}


COLUMNS = {"file": "file", "tests": "tests", "kvgraph": "kvgraph passes", "llama": "llama-server passes",
           "both": "both pass", "counted": "counted", "counted_kv": "kvgraph passes of those"}


def render_report(kv: dict, ll: dict | None) -> str:
    t = table(kv, ll)
    cols = ["file", "tests", "kvgraph"] + (["llama", "both", "counted", "counted_kv"] if ll is not None else [])
    lines = ["| " + " | ".join(COLUMNS[c] for c in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(row.get(c, "")) for c in cols) + " |" for row in t["rows"] + [t["total"]]]
    if ll is not None:
        tot = t["total"]
        lines.append(f"\nkvgraph passes **{tot['counted_kv']} of the {tot['counted']}** tests llama-server passes "
                     f"({tot['counted_kv'] / max(tot['counted'], 1):.1%}; 'counted': llama-server passes it and it "
                     "is not a test of llama.cpp internals).")
    return "\n".join(lines)


def render_exclusions() -> str:
    return "\n".join(f"- `{prefix.rstrip(':')}`{'' if prefix.endswith('::') else ''}: {why}"
                     for prefix, why in EXCLUDED.items())


def write_section(name: str, text: str) -> None:
    doc = REPO / "docs" / "compatibility.md"
    s = doc.read_text()
    begin, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    doc.write_text(s[:s.index(begin) + len(begin)] + "\n" + text + "\n" + s[s.index(end):])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-cpp", type=Path, required=True, help="llama.cpp source tree (holds tools/server/tests)")
    ap.add_argument("--llama-server", default=None, help="a built llama-server to run the same tests against")
    ap.add_argument("--model", default=None, help="GGUF every test's server loads (default: smollm2-135m)")
    ap.add_argument("--files", default=",".join(FILES), help="suite files to run (default: the ten above)")
    ap.add_argument("--json", type=Path, default=None, help="also write every test's outcome here")
    ap.add_argument("--llama-results", type=Path, default=None,
                    help="llama-server's outcomes from an earlier --json (instead of running it again)")
    ap.add_argument("-k", default=None, help="pytest -k expression (a subset)")
    ap.add_argument("--write-doc", action="store_true",
                    help="put the table (with llama-server's results) into docs/compatibility.md")
    args = ap.parse_args(argv)
    files = [f.removesuffix(".py") for f in args.files.split(",") if f]
    model = args.model or default_model()
    extra = ["-k", args.k] if args.k else []
    work = Path(tempfile.mkdtemp(prefix="llama-server-suite-"))
    tests = prepare(args.llama_cpp.resolve(), work, sys.executable)
    kv = run_suite(tests, work / "llama-server-shim", "kvgraph", model, files, extra, work / "kvgraph.log")
    ll = json.loads(args.llama_results.read_text())["llama-server"] if args.llama_results else None
    if args.llama_server:
        ll = run_suite(tests, work / "llama-server-shim", str(Path(args.llama_server).resolve()), model, files,
                       extra, work / "llama-server.log")
    report = render_report(kv, ll)
    print("\n" + report)
    if ll is not None:
        missing = sorted(n for n in kv if ll.get(n) == "passed" and kv[n] != "passed" and not excluded(n))
        if missing:
            print("passed by llama-server only:\n  " + "\n  ".join(missing))
        if args.write_doc:
            write_section("suite", report)
    if args.write_doc:
        write_section("exclusions", render_exclusions())
    if args.json:
        args.json.write_text(json.dumps({"kvgraph": kv, "llama-server": ll, "table": table(kv, ll)}, indent=1))
    print(f"\nlogs and the suite copy: {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
