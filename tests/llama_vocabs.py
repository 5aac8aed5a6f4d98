"""llama.cpp's tokenizer test vectors: models/ggml-vocab-*.gguf with .inp (texts) and .out (token ids), as the
llama-cpp-python==0.3.36 source distribution on PyPI carries them. Fetched once with pip (as the real
models are) into $KVGRAPH_HOME/vocab/, since together they are ~60 MB: too big for tests/data."""
from __future__ import annotations

import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

SDIST = "llama-cpp-python==0.3.36"
SEPARATOR = "\n__ggml_vocab_test__\n"


def vocab_dir() -> Path:
    from kvgraph.registry import model_home

    dest = model_home() / "vocab" / SDIST.replace("==", "-")
    if (dest / ".complete").exists():
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        "--no-cache-dir", "--disable-pip-version-check", "-d", tmp, SDIST],
                       check=True, capture_output=True, stdin=subprocess.DEVNULL, timeout=900)
        archive = next(Path(tmp).glob("*.tar.gz"))
        with tarfile.open(archive) as tar:
            for member in tar.getmembers():
                name = Path(member.name).name
                if member.isfile() and "/vendor/llama.cpp/models/" in member.name and name.startswith("ggml-vocab-"):
                    (dest / name).write_bytes(tar.extractfile(member).read())
    (dest / ".complete").write_text(SDIST)
    return dest


def cases(path: Path) -> list[tuple[str, list[int]]]:
    """(text, expected ids) pairs of a vocabulary's .inp / .out files."""
    texts = Path(str(path) + ".inp").read_text(encoding="utf-8").split(SEPARATOR)
    ids = Path(str(path) + ".out").read_text(encoding="utf-8").split("\n")
    return [(t, [int(x) for x in line.split()]) for t, line in zip(texts, ids)]
