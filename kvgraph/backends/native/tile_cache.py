"""Repacked weights kept between runs: the first load of a model file packs its tiles straight into a file
here, and every later load memory-maps that file, so that start-up no longer grows with the model, and the
weights are in memory once (the file's page cache pages), however many processes use them.

An entry is one file in $KVGRAPH_HOME/weights, named by what decides its contents:
  * the source file's identity: resolved path, device, inode, size, modification and change times (a file
    rewritten or replaced gets another name), and a hash of its tensor table with the first and last bytes of
    every tensor (a sample of its content, read in one page per tensor);
  * the tile format: a hash of the code that makes and reads tiles (the C kernels and the packing code), so
    a kvgraph whose tiles differ never reads an older one's. Tiles do not depend on the kernels' ISA build.
Layout: a 64-byte prefix (magic, version, where the index and the data lie, their checksums), the tiles from
the first page boundary on, matrices end to end in load order (so stacked siblings stay one view), then the
JSON index (the identity, and per matrix its name, format, shape, offset, exactness).

Never trusted: a load checks the prefix, the index and the identity in it, the file's length, and the
data's checksum (kvg_checksum, at memory speed) before using a byte; anything wrong is a miss, repacked and
written again. A writer packs into a private temporary file (disk space reserved before each matrix is
written, so a full disk is an error, not a fault) and renames it into place once whole, so concurrent first
loads (a server and a CLI, Ray replicas) each leave a whole entry and a reader never sees a partial one. A
folder that cannot be written (read-only, full) costs only the entry: the load packs into memory instead and
says so once.
"""
from __future__ import annotations

import importlib.util
import json
import math
import mmap
import os
import struct
import sys
import time
from pathlib import Path

import numpy as np

from . import SOURCE, TR, checksum, tile_bytes
from .mats import TileArena

VERSION = 3          # 3: a mixture's experts ([X, N, K] tensors) are kept too, as [X N, K] matrices
MAGIC = b"KVGTILES"
PREFIX = struct.Struct("<8sIIQQQQQQ")   # magic, version, 0, index at, index bytes, data at, data bytes, sums
DATA_AT = 4096
SUFFIX = ".kvgtiles"
MIN_BYTES = 16 << 20    # smaller models pack in well under 0.1 s: an entry would cost more than it saves
STALE_TEMP_SECONDS = 3600
_PACKING_CODE = ("kernels.c", "__init__.py", "mats.py", "../quant_repack.py")
_warned: set[str] = set()


def cache_dir() -> Path:
    from ...registry import model_home

    return model_home() / "weights"


def enabled() -> bool:
    return os.environ.get("KVGRAPH_WEIGHT_CACHE", "on").strip().lower() not in ("0", "off", "no", "false")


def _say_once(what: str) -> None:
    if what not in _warned:
        _warned.add(what)
        print(f"kvgraph: {what}", file=sys.stderr)


def tile_format_id() -> str:
    """A hash of the code that decides the tiles' bytes (SipHash: no OpenSSL loaded)."""
    here = SOURCE.parent
    code = b"".join((here / name).read_bytes() for name in _PACKING_CODE)
    return importlib.util.source_hash(code + str(VERSION).encode()).hex()


def _identity(gguf_file) -> dict:
    path = gguf_file.path.resolve()
    st = os.stat(path)
    table = bytearray()
    for name, info in gguf_file.tensors.items():
        raw = info.data.reshape(-1).view(np.uint8)
        table += f"{name}:{info.type_name}:{info.shape}:{info.n_bytes};".encode()
        table += raw[:64].tobytes() + raw[-64:].tobytes()
    return {"path": str(path), "dev": st.st_dev, "ino": st.st_ino, "size": st.st_size,
            "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns,
            "tensors": importlib.util.source_hash(bytes(table)).hex(), "tiles": tile_format_id()}


def _entry_name(identity: dict) -> str:
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(identity["path"]).stem)[:80]
    tag = importlib.util.source_hash(json.dumps(identity, sort_keys=True).encode()).hex()
    return f"{stem}-{tag}{SUFFIX}"


def _read_index(path: Path, verify: bool = True) -> tuple[dict, tuple[int, int, int]] | None:
    """An entry's (index, (data at, data bytes, data checksum)), or None where its prefix, index or length
    is wrong (verify=False: the index's checksum unchecked, for listing)."""
    with open(path, "rb") as f:
        head = f.read(PREFIX.size)
        if len(head) < PREFIX.size:
            return None
        magic, version, _, index_at, n_index, data_at, n_data, data_sum, index_sum = PREFIX.unpack(head)
        size = os.fstat(f.fileno()).st_size
        if (magic != MAGIC or version != VERSION or data_at != DATA_AT or index_at != data_at + n_data
                or size != index_at + n_index or n_index > 1 << 26):
            return None
        f.seek(index_at)
        raw = f.read(n_index)
    if len(raw) != n_index or (verify and checksum(np.frombuffer(raw, np.uint8)) != index_sum):
        return None
    try:
        index = json.loads(raw)
    except ValueError:
        return None
    return (index, (data_at, n_data, data_sum)) if isinstance(index, dict) else None


class CachedTiles:
    """One matrix's tiles in a mapped entry (what NativeMat.from_tiles takes)."""

    __slots__ = ("tiles", "fmt", "n", "k", "exact", "block")

    def __init__(self, tiles: np.ndarray, fmt: str, n: int, k: int, exact: bool, block: np.ndarray):
        self.tiles, self.fmt, self.n, self.k, self.exact, self.block = tiles, fmt, n, k, exact, block


class FileArena(TileArena):
    """Tiles packed straight into a new entry's file, end to end from DATA_AT: its page cache pages are the
    weights (no second copy, nothing to write afterwards). Each matrix's disk space is reserved before it is
    packed; where that fails (a full disk), the rest goes into anonymous memory and `failed` says why."""

    def __init__(self, path: Path, reserve: int):
        super().__init__()
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.ftruncate(self.fd, DATA_AT + reserve)       # sparse: address space only, until fallocate
            self.file_map = mmap.mmap(self.fd, DATA_AT + reserve, flags=mmap.MAP_SHARED)
        except OSError:
            os.close(self.fd)
            raise
        self.data = np.frombuffer(self.file_map, np.uint8)
        self.end = DATA_AT                    # the file's length so far
        self.failed: str | None = None

    def take(self, rows: int, row_bytes: int) -> tuple[np.ndarray, np.ndarray]:
        n = rows * row_bytes
        if self.failed is None:
            if self.end + n > len(self.file_map):
                self.failed = "more tiles than reserved"
            else:
                try:
                    os.posix_fallocate(self.fd, self.end, n)
                except OSError as exc:
                    self.failed = exc.strerror or str(exc)
        if self.failed is not None:
            return super().take(rows, row_bytes)
        out = self.data[self.end: self.end + n].reshape(rows, row_bytes)
        self.end += n
        return out, self.data

    def offset(self, tiles: np.ndarray) -> int | None:
        """Where tiles lie in the data region (None: not in this file)."""
        at = tiles.ctypes.data - self.data.ctypes.data
        return at - DATA_AT if DATA_AT <= at < self.end else None

    def close(self) -> None:
        os.close(self.fd)


class TileCache:
    """The repacked-weights entry of one model file, for one load: `lookup(name)` gives a matrix's cached
    tiles on a hit; on a miss `arena` (a FileArena, or None where the folder cannot take one) is where the
    backend packs, it `record`s each matrix, and `finish` completes and renames the entry."""

    def __init__(self, gguf_file, directory: Path | None = None):
        self.directory = directory or cache_dir()
        self.identity = _identity(gguf_file)
        self.path = self.directory / _entry_name(self.identity)
        self.recorded: list[tuple[str, object]] = []
        self.hit: dict[str, CachedTiles] = {}
        self.arena: FileArena | None = None
        self.state = "miss"            # "hit", "written", "small", or why it was not written
        self._map: mmap.mmap | None = None
        try:
            self._open()
        except OSError:
            pass
        if self.state == "miss":
            self._start_entry(gguf_file)

    def _open(self) -> None:
        if not self.path.is_file():
            return
        found = _read_index(self.path)
        if found is None or found[0].get("identity") != self.identity:
            _say_once(f"the repacked-weights cache entry {self.path} is damaged; repacking and writing it again")
            return
        index, (data_at, n_data, data_sum) = found
        with open(self.path, "rb") as f:
            m = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0),
                          prot=mmap.PROT_READ)
        data = np.frombuffer(m, np.uint8, n_data, data_at)
        if checksum(data) != data_sum:
            del data
            m.close()
            _say_once(f"the repacked-weights cache entry {self.path} is corrupt (checksum); repacking and "
                      "writing it again")
            return
        try:
            for name, fmt, n, k, exact, at, rows, row_bytes in index["matrices"]:
                tiles = data[at: at + rows * row_bytes].reshape(rows, row_bytes)
                self.hit[name] = CachedTiles(tiles, fmt, n, k, bool(exact), data)
        except (KeyError, TypeError, ValueError):
            self.hit.clear()
            return
        self._map, self.state = m, "hit"

    def _start_entry(self, gguf_file) -> None:
        """A temporary file to pack into, with address space for the largest tiles the file's matrices (and
        stacked experts) can take (Q8's, 17 bytes per 16 weights; disk space is reserved matrix by matrix as
        they are packed)."""
        reserve = largest_tiles(gguf_file)
        if reserve < MIN_BYTES // 2:
            self.state = "small"
            return
        self._tmp = self.directory / f".{self.path.name}.{os.getpid()}.{time.monotonic_ns()}.tmp"
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self.arena = FileArena(self._tmp, 2 * reserve)
        except OSError as exc:
            self._not_written(exc.strerror or str(exc))

    def _not_written(self, why: str) -> None:
        self.state = f"not written: {why}"
        _say_once(f"cannot keep the repacked weights in {self.directory} ({why}); this run packs them in memory, "
                  "and the next one will pack them again")
        remove_entry(self._tmp)

    def lookup(self, name: str) -> CachedTiles | None:
        return self.hit.get(name)

    def record(self, name: str, mat) -> None:
        if self.arena is not None:
            self.recorded.append((name, mat))

    def finish(self) -> None:
        """After a load that packed into the entry's file: index, checksums, and the rename that publishes it."""
        arena, self.arena = self.arena, None
        if arena is None:
            return
        try:
            matrices = []
            for name, m in self.recorded:
                at = arena.offset(m.tiles)
                if at is None:          # packed into memory after the disk filled up
                    raise OSError(arena.failed or f"{name} was packed outside the entry")
                rows, row_bytes = m.tiles.shape
                matrices.append([name, m.fmt, m.n, m.k, bool(m.exact), at, rows, row_bytes])
            if arena.failed:
                raise OSError(arena.failed)
            n_data = arena.end - DATA_AT
            if n_data < MIN_BYTES:
                self.state = "small"
                remove_entry(self._tmp)
                return
            index = json.dumps({"identity": self.identity, "matrices": matrices}).encode()
            data_sum = checksum(arena.data[DATA_AT: arena.end])
            os.pwrite(arena.fd, index, arena.end)
            os.ftruncate(arena.fd, arena.end + len(index))
            os.pwrite(arena.fd, PREFIX.pack(MAGIC, VERSION, 0, arena.end, len(index), DATA_AT, n_data, data_sum,
                                            checksum(np.frombuffer(index, np.uint8))), 0)
            os.replace(self._tmp, self.path)
            self.state = "written"
        except OSError as exc:
            self._not_written(exc.strerror or str(exc))
            return
        finally:
            arena.close()
        self._collect_stale()

    def _collect_stale(self) -> None:
        """Entries this one replaces (same source path, another identity), entries whose source is gone, and
        temporary files a killed writer left."""
        for other in list_entries(self.directory):
            if other["file"] == self.path:
                continue
            source = other.get("source")
            if source is None or source == self.identity["path"] or not Path(source).exists():
                remove_entry(other["file"])


def largest_tiles(gguf_file) -> int:
    """The most bytes a file's matrices and stacked experts can take in tiles (Q8's, the largest)."""
    return sum(-(-math.prod(info.shape[:-1]) // TR) * tile_bytes("q8", info.shape[-1])
               for info in gguf_file.tensors.values() if len(info.shape) in (2, 3) and info.type_name != "F32")


def list_entries(directory: Path | None = None) -> list[dict]:
    """The entries in the cache folder: file, bytes, source path (None where damaged); temporary files a
    writer left more than an hour ago are removed on the way."""
    directory = directory or cache_dir()
    out = []
    try:
        files = sorted(directory.iterdir())
    except OSError:
        return out
    now = time.time()
    for f in files:
        try:
            if f.name.endswith(".tmp") and now - f.stat().st_mtime > STALE_TEMP_SECONDS:
                f.unlink()
            elif f.name.endswith(SUFFIX):
                found = _read_index(f, verify=False)
                source = found[0].get("identity", {}).get("path") if found else None
                out.append({"file": f, "bytes": f.stat().st_size, "source": source})
        except OSError:
            continue
    return out


def remove_entry(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass
