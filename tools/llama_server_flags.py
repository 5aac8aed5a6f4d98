#!/usr/bin/env python3
"""llama-server's flags, read from its --help, for `kvgraph serve` and docs/compatibility.md.

    python tools/llama_server_flags.py --llama-server PATH/llama-server   # re-read the flag list (new llama.cpp)
    python tools/llama_server_flags.py                                    # only re-render the doc's flag table

Writes kvgraph/cli/llama_server_flags.json (every flag: its names, whether it takes a value, the first line of
its help) and the flag table of docs/compatibility.md, between its `<!-- flags -->` markers, from that list and
from how kvgraph takes each flag (kvgraph/cli/llama_flags.py). tests/test_llama_server.py checks both are current.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FLAGS_JSON = REPO / "kvgraph" / "cli" / "llama_server_flags.json"
DOC = REPO / "docs" / "compatibility.md"
BEGIN, END = "<!-- flags -->", "<!-- /flags -->"
# Chat templates from llama.cpp's models/templates (copies of the models' own) that tests/test_llama_server.py
# renders: reasoning on and off, prefill, today's date.
TEST_TEMPLATES = ("Qwen-Qwen3-0.6B.jinja", "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja",
                  "CohereForAI-c4ai-command-r7b-12-2024-tool_use.jinja", "meta-llama-Llama-3.3-70B-Instruct.jinja")


def parse_help(text: str) -> list[dict]:
    """One entry per option of llama-server --help: names, value (None: a switch; '[x]': optional), help."""
    entries, section = [], ""
    for line in text.splitlines():
        head = re.match(r"^----- (.*) -----$", line)
        if head:
            section = head.group(1).removesuffix(" params")
            continue
        if line.startswith("-"):
            # the help column starts at 40; a longer spec puts its help on the next line
            spec, rest = (line[:40], line[40:]) if line[38:40] == "  " else (line, "")
            tokens = spec.replace(",", " ").split()
            names = [t for t in tokens if t.startswith("-")]
            value = " ".join(t for t in tokens if not t.startswith("-")) or None
            entries.append({"names": names, "value": value, "help": rest.strip(), "section": section})
        elif entries and line.startswith(" " * 20) and not entries[-1]["help"]:
            entries[-1]["help"] = line.strip()
    for e in entries:
        e["help"] = re.sub(r"\s*\(env: [A-Z_]+\)", "", e["help"]).strip()
    return entries


def render_table(entries: list[dict]) -> str:
    sys.path.insert(0, str(REPO))
    from kvgraph.cli.llama_flags import classify

    rows = ["| llama-server | what it does there | `kvgraph serve` |", "|---|---|---|"]
    for e in entries:
        names = ", ".join(f"`{n}`" for n in e["names"]) + (f" `{e['value']}`" if e["value"] else "")
        how = "; ".join(dict.fromkeys(classify(n).doc() for n in e["names"]))
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in (names, e["help"], how)) + " |")
    return "\n".join(rows)


def write_doc(entries: list[dict]) -> None:
    doc = DOC.read_text()
    start, end = doc.index(BEGIN) + len(BEGIN), doc.index(END)
    DOC.write_text(doc[:start] + "\n" + render_table(entries) + "\n" + doc[end:])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--llama-server", default=None, help="a built llama-server whose --help is read")
    ap.add_argument("--llama-cpp", type=Path, default=None,
                    help="a llama.cpp source tree: copy the chat templates the tests render into tests/data/templates")
    args = ap.parse_args(argv)
    if args.llama_cpp:
        dest = REPO / "tests" / "data" / "templates"
        dest.mkdir(parents=True, exist_ok=True)
        for name in TEST_TEMPLATES:
            (dest / name).write_bytes((args.llama_cpp / "models" / "templates" / name).read_bytes())
        print(f"{len(TEST_TEMPLATES)} templates -> {dest.relative_to(REPO)}")
    if args.llama_server:
        text = subprocess.run([args.llama_server, "--help"], capture_output=True, text=True, check=True).stdout
        entries = [e for e in parse_help(text) if e["names"] != ["-h", "--help", "--usage"]]
        FLAGS_JSON.write_text(json.dumps(entries, indent=0) + "\n")
        print(f"{len(entries)} flags -> {FLAGS_JSON.relative_to(REPO)}")
    write_doc(json.loads(FLAGS_JSON.read_text()))
    print(f"flag table -> {DOC.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
