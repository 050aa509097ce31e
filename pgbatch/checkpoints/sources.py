"""Byte sources: bulk reads from one logical file (one object, or split parts read as one) at any fsspec URL.

Local files are read sequentially; object stores get windows of concurrent ranged requests. Host memory stays
bounded by one window plus the array being filled.
"""
from __future__ import annotations

import bisect
import io
import os
import re
import zlib
from typing import Optional

import fsspec
import numpy as np

from pgbatch.checkpoints.errors import CheckpointError, corrupt
from pgbatch.fsutil import is_local

READ_CHUNK = 16 << 20      # bytes per local read: the fixed host-memory overhead of streaming (plus one fsspec block)
REMOTE_REQUEST = 16 << 20  # bytes per ranged request on object stores
REMOTE_CONCURRENCY = int(os.environ.get("PGBATCH_CKPT_CONCURRENCY", "4"))  # ranged requests in flight (64 MiB)
BLOCK_SIZE = 1 << 20       # fsspec read-ahead block: small, so header reads do not pull whole blocks of tensors


def open_read(fs, path: str, block_size: int = BLOCK_SIZE):
  """Opens for header reads at scattered offsets: a plain read-ahead block cache (small reads are served from one
  block; tensor data goes through ByteSource). gcsfs' default adaptive prefetcher is not used: it assumes one
  forward scan and stalled for seconds on every seek (HF loads from gs:// took 70x longer)."""
  if is_local(fs):
    return fs.open(path, "rb")
  try:
    return fs.open(path, "rb", block_size=block_size, cache_type="readahead")
  except TypeError:  # a filesystem without cache options
    return fs.open(path, "rb")


def _readinto_full(f, out: memoryview, uri: str, what: str) -> None:
  """Fills `out` from file `f` (any file-like with readinto) or raises CorruptCheckpointError on a short read."""
  n = 0
  while n < len(out):
    got = f.readinto(out[n:n + READ_CHUNK])
    if not got:
      raise corrupt(uri, f"{what}: expected {len(out)} bytes, file ended after {n}")
    n += got


class ByteSource:
  """Bulk reads from one logical file (one object, or split parts read as one): `readinto(offset, out)`.

  Local files are read sequentially. On object stores each read goes out as windows of concurrent ranged
  requests (`fs.cat_ranges`: REMOTE_CONCURRENCY requests of REMOTE_REQUEST bytes), which is what makes
  gs:// / s3:// loads fast; memory stays bounded by one window.
  """

  def __init__(self, uri: str, fs, paths: list[str], sizes: list[int]):
    self.uri, self.fs, self.paths = uri, fs, paths
    self.starts = [0]
    for size in sizes:
      self.starts.append(self.starts[-1] + size)
    self.local = is_local(fs)
    self.window = READ_CHUNK if self.local else REMOTE_REQUEST * REMOTE_CONCURRENCY
    self._f = None

  def readinto(self, offset: int, out: memoryview, what: str) -> None:
    """Fills `out` with the bytes at [offset, offset + len(out)) or raises CorruptCheckpointError."""
    if offset + len(out) > self.starts[-1]:
      raise corrupt(self.uri, f"{what}: needs bytes up to {offset + len(out)}, the file has {self.starts[-1]}")
    if self.local:
      if self._f is None:
        self._f = (open_read(self.fs, self.paths[0]) if len(self.paths) == 1 else
                   io.BufferedReader(PartsReader(self.fs, self.paths, np.diff(self.starts).tolist())))
      self._f.seek(offset)
      _readinto_full(self._f, out, self.uri, what)
      return
    pieces, pos = [], 0  # (path, start, end, position in out); never across a part boundary
    while pos < len(out):
      at = offset + pos
      i = bisect.bisect_right(self.starts, at) - 1
      n = min(REMOTE_REQUEST, len(out) - pos, self.starts[i + 1] - at)
      pieces.append((self.paths[i], at - self.starts[i], at - self.starts[i] + n, pos))
      pos += n
    for w in range(0, len(pieces), REMOTE_CONCURRENCY):
      batch = pieces[w:w + REMOTE_CONCURRENCY]
      datas = self.fs.cat_ranges([p[0] for p in batch], [p[1] for p in batch], [p[2] for p in batch])
      for (path, start, end, at), data in zip(batch, datas):
        if isinstance(data, BaseException):
          raise data
        if len(data) != end - start:
          raise corrupt(self.uri, f"{what}: {os.path.basename(path)} returned {len(data)} of bytes "
                         f"{start}-{end}")
        out[at:at + len(data)] = data
      del datas

  def close(self):
    if self._f is not None:
      self._f.close()
      self._f = None


def read_cast(src: ByteSource, offset: int, shape: tuple[int, ...], stored: np.dtype, dtype: Optional[np.dtype],
               what: str, crc: Optional[int] = None) -> tuple[np.ndarray, Optional[int]]:
  """Reads a row-major array of `stored` dtype at `offset` of `src` into a new array of `dtype` (default: stored),
  casting chunk by chunk, so host memory holds the result plus one chunk. Returns (array, zlib.crc32 continued
  from `crc` over the raw bytes, or None when `crc` is None)."""
  dtype = stored if dtype is None else np.dtype(dtype)
  out = np.empty(shape, dtype)
  flat = out.reshape(-1)
  if dtype == stored:  # straight into the result
    buf = memoryview(flat.view(np.uint8)) if flat.size else memoryview(b"")
    src.readinto(offset, buf, what)
    return out, (None if crc is None else zlib.crc32(buf, crc))
  per = max(1, src.window // stored.itemsize)
  stage = np.empty(min(per, flat.size), stored)
  for i in range(0, flat.size, per):
    n = min(per, flat.size - i)
    buf = memoryview(stage[:n].view(np.uint8))
    src.readinto(offset + i * stored.itemsize, buf, what)
    if crc is not None:
      crc = zlib.crc32(buf, crc)
    flat[i:i + n] = stage[:n]
  return out, crc


class PartsReader(io.RawIOBase):
  """Read-only, seekable view of several files as one (split `x.npz.part00, part01, …`); nothing is copied."""

  def __init__(self, fs, paths: list[str], sizes: list[int]):
    super().__init__()
    self._fs, self._paths = fs, paths
    self._starts = [0]
    for s in sizes:
      self._starts.append(self._starts[-1] + s)
    self._pos = 0
    self._files = {}

  def readable(self):
    return True

  def seekable(self):
    return True

  def tell(self):
    return self._pos

  def seek(self, offset, whence=io.SEEK_SET):
    base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._starts[-1]}[whence]
    self._pos = max(0, base + offset)
    return self._pos

  def _part(self, i):
    if i not in self._files:
      self._files[i] = open_read(self._fs, self._paths[i])
    return self._files[i]

  def readinto(self, b):
    out = memoryview(b).cast("B")
    n = 0
    while n < len(out) and self._pos < self._starts[-1]:
      i = bisect.bisect_right(self._starts, self._pos) - 1
      f = self._part(i)
      f.seek(self._pos - self._starts[i])
      want = min(len(out) - n, self._starts[i + 1] - self._pos)
      got = f.readinto(out[n:n + want])
      if not got:
        break
      n += got
      self._pos += got
    return n

  def close(self):
    for f in self._files.values():
      f.close()
    self._files = {}
    super().close()


class StreamOut:
  """Write-only, unseekable wrapper: zipfile then writes data descriptors instead of seeking back."""

  def __init__(self, f):
    self._f = f

  def write(self, b):
    return self._f.write(b)

  def flush(self):
    pass

  def tell(self):
    raise OSError("unseekable")

  def seek(self, *_):
    raise OSError("unseekable")


def resolve(uri: str):
  try:
    fs, path = fsspec.core.url_to_fs(uri)
  except (ImportError, ValueError) as e:
    raise CheckpointError(f"cannot open checkpoint {uri}: {e}") from None
  return fs, path.rstrip("/")


def file_info(fs, path):
  try:
    return fs.info(path)
  except (FileNotFoundError, NotADirectoryError):
    return None


def glob_escape(path: str) -> str:
  return re.sub(r"([*?\[\]])", r"[\1]", path)

