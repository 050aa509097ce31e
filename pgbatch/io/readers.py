"""Readers: input shards (WebDataset tar, Parquet with image bytes, image files) -> one row dict per sample.

Any fsspec URL works (local paths, file://, gs:// through gcsfs, s3:// ...). Shards are listed once on the
driver (`list_shards`, sorted, deterministic) and read in Ray tasks (`read_shard`).

`read_shard` never raises for bad data: every sample becomes exactly one row, and a shard that cannot be
opened or is cut short gives the rows it could read plus ONE error row (stage "read"); an empty shard gives one
error row (key "__shard__", type EmptyShard) so that the driver sees it complete. Transient I/O errors
(connection resets, timeouts: anything that is not a data or not-found/permission error) do propagate, so that
Ray retries the task instead of committing a shard full of errors.

Row (every key present in every row):
  key: str            sample key, unique within the shard (duplicates get "#dupN" and are error rows)
  shard: str          Shard.id
  source_uri: str     "<tar uri>#<member>", "<parquet uri>#row<N>", or the image file URI
  image_bytes: bytes | None
  metadata: str       JSON object (WebDataset sidecars by extension, other Parquet columns); "{}" if none
  status: str         "ok" | "error"
  error: dict | None  `pgbatch.rows.error` struct {"stage", "type", "message"} when status is "error"
  _shard_rows: int    number of rows read_shard returned for this shard (rows.SHARD_ROWS)
"""
from __future__ import annotations

import base64
import dataclasses
import datetime
import decimal
import json
import logging
import os
import posixpath
import re
import tarfile
from typing import Any, Iterator

import fsspec

from pgbatch import rows as rows_lib
from pgbatch.fsutil import is_local
from pgbatch.io import decode

log = logging.getLogger(__name__)

FORMATS = ("webdataset", "parquet", "images")
IMAGE_EXTENSIONS = decode.image_extensions()   # = what the decoder opens (jpg, png, webp, avif, jp2, qoi, ...)
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
PARQUET_SUFFIXES = (".parquet", ".pq")
# WebDataset members whose text goes into `metadata` (under their extension); .json is parsed.
SIDECAR_EXTENSIONS = ("json", "txt", "cls", "text", "caption", "cap")
MAX_SIDECAR_BYTES = 1 << 20
SHARD_KEY = "__shard__"
FETCH_CONCURRENCY = 16  # image files fetched at once from object stores

# Errors that mean the data (or its absence) is permanent: they become error rows. Anything else propagates.
# PermissionError is deliberately not one: wrong credentials must fail the job, not commit a bucket of error rows.
DATA_ERRORS: tuple[type[BaseException], ...] = (
    tarfile.TarError, EOFError, ValueError, UnicodeDecodeError, FileNotFoundError, IsADirectoryError,
    NotADirectoryError, KeyError, IndexError, TypeError)


class InputError(ValueError):
  """The input spec itself is wrong (nothing matched, unknown format): raised on the driver, before Ray."""


class InputColumnError(InputError):
  """The input's columns do not fit the spec (image column missing or of a type the reader cannot take)."""


@dataclasses.dataclass(frozen=True)
class Shard:
  id: str                 # stable identity: the file URI (webdataset/parquet) or "<first file URI>+<n>" (images)
  uris: tuple[str, ...]   # files to read (one for tar/parquet)
  # the listed object's identity (size, generation, etag, mtime: what the store reports), for tar/parquet
  version: dict | None = dataclasses.field(default=None, compare=False)


VERSION_KEYS = ("size", "generation", "etag", "mtime")


def object_version(info: dict) -> dict:
  """What identifies one version of a listed object: size plus generation / etag / mtime where the store has
  them (GCS: generation and etag; S3: etag; local: mtime)."""
  out = {}
  for k in VERSION_KEYS:
    v = info.get(k, info.get("ETag") if k == "etag" else info.get("LastModified") if k == "mtime" else None)
    if v is not None:
      out[k] = int(v) if k == "size" else (float(v) if k == "mtime" and isinstance(v, (int, float)) else str(v))
  return out


def version_changed(recorded: dict | None, current: dict | None) -> list[str]:
  """The version fields both sides have that differ (empty: unchanged, or nothing to compare)."""
  if not recorded or not current:
    return []
  return [k for k in VERSION_KEYS if k in recorded and k in current and recorded[k] != current[k]]


def read_error(type_: str, message: str) -> dict:
  """The error struct of a row the reader could not produce an image for (stage "read")."""
  return rows_lib.error("read", type_, message)


def make_row(key: str, shard: str, source_uri: str, image_bytes: bytes | None = None, metadata: str = "{}",
             error: dict | None = None) -> dict:
  """One reader row; status is derived from `error`. rows.SHARD_ROWS is filled in by read_shard."""
  return {"key": key, "shard": shard, "source_uri": source_uri, "image_bytes": image_bytes, "metadata": metadata,
          "status": "error" if error else "ok", "error": error, rows_lib.SHARD_ROWS: 0}


# ---------------------------------------------------------------------------------------------------------
# listing

def _fs(uri: str, storage_options: dict | None) -> tuple[fsspec.AbstractFileSystem, str]:
  return fsspec.core.url_to_fs(uri, **(storage_options or {}))


def to_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
  """A path of `fs` as a URI: absolute local path, or with protocol ("gs://b/x.tar")."""
  if is_local(fs):
    return os.path.abspath(path)
  return fs.unstrip_protocol(path)


_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
  """WebDataset-style brace expansion: "a-{000..002}.tar" -> a-000.tar a-001.tar a-002.tar; "{x,y}" -> x y."""
  m = _BRACE.search(pattern)
  if not m:
    return [pattern]
  body, head, tail = m.group(1), pattern[:m.start()], pattern[m.end():]
  r = re.fullmatch(r"(\d+)\.\.(\d+)", body)
  if r:
    lo, hi = r.group(1), r.group(2)
    width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
    step = 1 if int(hi) >= int(lo) else -1
    alts = [str(i).zfill(width) for i in range(int(lo), int(hi) + step, step)]
  elif "," in body:
    alts = body.split(",")
  else:
    return [head + "{" + body + "}" + t for t in expand_braces(tail)]
  return [head + a + t for a in alts for t in expand_braces(tail)]


def _skip_reason(path: str, fmt: str, root: str = "") -> str | None:
  """Why a listed file is not part of the input (None: it is): hidden ("." anywhere under `root`), for Parquet
  "_"-prefixed (_SUCCESS, _metadata, ... as pyarrow/Spark datasets ignore them), or not the format's
  extension. Image files starting with "_" (e.g. cameras' "_DSC0001.JPG") are kept."""
  rel = path[len(root):] if root and path.startswith(root) else posixpath.basename(path)
  parts = [x for x in rel.split("/") if x]
  if any(x.startswith(".") for x in parts):
    return "hidden"
  if fmt == "parquet" and any(x.startswith("_") for x in parts):
    return "'_'-prefixed"
  name = posixpath.basename(path).lower()
  if fmt == "webdataset" and not name.endswith(TAR_SUFFIXES):
    return "not a tar"
  if fmt == "parquet" and not name.endswith(PARQUET_SUFFIXES):
    return "not .parquet"
  if fmt == "images" and name.rsplit(".", 1)[-1] not in IMAGE_EXTENSIONS:
    return "not an image extension"
  return None


def _wanted(path: str, fmt: str, root: str = "") -> bool:
  return _skip_reason(path, fmt, root) is None


def list_inputs(uri: str, fmt: str, storage_options: dict | None = None
                ) -> tuple[fsspec.AbstractFileSystem, dict[str, dict], dict[str, int]]:
  """(fs, path -> object version, skip reason -> count) of the files a URI names (see `list_files`). A listing
  that skipped files logs how many and why."""
  if fmt not in FORMATS:
    raise InputError(f"input.format: unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
  fs, _ = _fs(uri, storage_options)
  found: dict[str, dict] = {}
  skipped: dict[str, int] = {}

  def take(p: str, info: dict, root: str | None) -> None:
    why = None if root is None else _skip_reason(p, fmt, root)
    if why is None:
      found[p] = object_version(info)
    else:
      skipped[why] = skipped.get(why, 0) + 1

  for pat in expand_braces(uri):
    _, path = _fs(pat, storage_options)
    if any(c in path for c in "*?["):
      for p, info in fs.glob(path, detail=True).items():
        if info.get("type") != "directory":
          # An explicit glob is taken as given for tar/parquet; for loose image files, skip non-image files.
          take(p, info, "" if fmt == "images" else None)
    elif fs.isdir(path):
      for p, info in fs.find(path, detail=True).items():
        take(p, info, path.rstrip("/") + "/")
    elif fs.exists(path):
      take(path, fs.info(path), None)
  if skipped:
    log.warning("input %s: skipped %d listed file(s): %s", uri, sum(skipped.values()),
                ", ".join(f"{n} {why}" for why, n in sorted(skipped.items())))
  return fs, dict(sorted(found.items())), skipped


def list_files(uri: str, fmt: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem,
                                                                                   list[str]]:
  """Files a URI names: a glob (fsspec: *, **, ?, [..]; plus WebDataset braces), a directory (every file of
  the format under it, recursively), or one file. Sorted, duplicates removed."""
  fs, found, _ = list_inputs(uri, fmt, storage_options)
  return fs, list(found)


def list_shards(uri: str, format: str, *, files_per_shard: int = 1000,  # pylint: disable=redefined-builtin
                storage_options: dict | None = None, done: frozenset[str] | set[str] = frozenset()) -> list[Shard]:
  """Shards of an input URI, sorted and deterministic. Raises InputError when nothing matches.

  webdataset / parquet: one shard per file, id = the file URI, `version` = its listed object version.
  images: the files of each directory not in `done` (image URIs an earlier run committed), sorted, in chunks
  of `files_per_shard`; id = "<first file URI>+<n>". Chunks are per directory, and only of files not done, so
  files added later (sorting anywhere) form new shards with new ids: committed shards are never redone.
  """
  if files_per_shard < 1:
    raise InputError(f"files_per_shard: must be >= 1, got {files_per_shard}")
  fs, found, _ = list_inputs(uri, format, storage_options)
  if not found:
    what = {"webdataset": "tar shards", "parquet": "parquet files", "images": "image files"}.get(format, "files")
    raise InputError(f"input.uri: {uri!r} matched no {what} (format {format})")
  if format != "images":
    return [Shard(to_uri(fs, p), (to_uri(fs, p),), v) for p, v in found.items()]
  return image_shards([to_uri(fs, p) for p in found], files_per_shard, done)


def image_shards(uris: list[str], files_per_shard: int, done: frozenset[str] | set[str] = frozenset()) -> list[Shard]:
  """Image file URIs not in `done`, grouped per directory (sorted) into shards of `files_per_shard`."""
  by_dir: dict[str, list[str]] = {}
  for u in sorted(uris):
    if u not in done:
      by_dir.setdefault(posixpath.dirname(u), []).append(u)
  shards = []
  for d in sorted(by_dir):
    us = by_dir[d]
    for i in range(0, len(us), files_per_shard):
      chunk = tuple(us[i:i + files_per_shard])
      shards.append(Shard(f"{chunk[0]}+{len(chunk)}", chunk))
  return shards


# ---------------------------------------------------------------------------------------------------------
# reading

def read_shard(shard: Shard, format: str, *, image_column: str = "image",  # pylint: disable=redefined-builtin
               key_column: str | None = "key", storage_options: dict | None = None,
               allowed_roots: tuple[str, ...] | None = None) -> list[dict]:
  """All rows of one shard (see the module doc). Keys are unique within the result. `allowed_roots`: where
  paths found inside the data may point (`pgbatch.io.sources`; default: the shard's own folder)."""
  if format == "webdataset":
    rows = list(read_webdataset(shard, storage_options))
  elif format == "parquet":
    rows = list(read_parquet(shard, image_column, key_column, storage_options, allowed_roots=allowed_roots))
  elif format == "images":
    rows = list(read_images(shard, storage_options))
  else:
    raise InputError(f"input.format: unknown format {format!r}; expected one of {', '.join(FORMATS)}")
  if not rows:  # a valid but empty shard still gets one row, so that the driver can see it complete
    uri = shard.uris[0] if len(shard.uris) == 1 else shard.id
    rows = [make_row(SHARD_KEY, shard.id, uri, error=read_error("EmptyShard", f"{uri} holds no samples"))]
  rows = dedupe_keys(fill_null_keys(rows))
  for r in rows:
    r[rows_lib.SHARD_ROWS] = len(rows)
  return rows


def fill_null_keys(rows: list[dict]) -> list[dict]:
  """Rows whose key column is null get "#row<N>" (N: the row number in the file), with "#" appended until it
  is no key of the shard: a fallback never takes a real key's place."""
  taken = {r["key"] for r in rows if r["key"] is not None}
  for r in rows:
    if r["key"] is None:
      key = "#" + r["source_uri"].rsplit("#", 1)[-1]
      while key in taken:
        key += "#"
      taken.add(key)
      r["key"] = key
  return rows


def dedupe_keys(rows: list[dict]) -> list[dict]:
  """Second and later rows with an already-seen key become error rows keyed "<key>#dupN" (never dropped)."""
  seen: dict[str, int] = {}
  taken = {r["key"] for r in rows}
  for r in rows:
    k = r["key"]
    if k not in seen:
      seen[k] = 0
      continue
    n = seen[k]
    while True:
      n += 1
      new = f"{k}#dup{n}"
      if new not in taken:
        break
    seen[k] = n
    taken.add(new)
    r.update(key=new, image_bytes=None, status="error",
             error=read_error("DuplicateKey", f"key {k!r} occurs more than once in the shard; "
                              f"this later occurrence is kept as {new!r}"))
  return rows


def _shard_error(shard: Shard, uri: str, e: BaseException, key: str = SHARD_KEY, what: str = "reading") -> dict:
  log.warning("shard %s: error %s %s: %r", shard.id, what, uri, e)
  return make_row(key, shard.id, uri, error=read_error(type(e).__name__, f"{what} {uri}: {e}"))


def _open(uri: str, storage_options: dict | None):
  return fsspec.open(uri, "rb", **(storage_options or {}))


# -- WebDataset

def split_member(name: str) -> tuple[str, str]:
  """WebDataset naming: "dir/abc.seg.png" -> ("dir/abc", "seg.png") (key = path up to the first dot of the
  basename)."""
  while name.startswith("./"):
    name = name[2:]
  d, base = posixpath.split(name)
  stem, _, ext = base.partition(".")
  return (posixpath.join(d, stem) if d else stem), ext.lower()


def _is_image_ext(ext: str) -> bool:
  return ext.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS


def _sidecar(ext: str, data: bytes) -> Any:
  if len(data) > MAX_SIDECAR_BYTES:
    return f"<{len(data)} bytes omitted>"
  text = data.decode("utf-8", errors="replace")
  if ext.endswith("json"):
    try:
      return json.loads(text)
    except ValueError:
      return text
  return text.strip() if ext.endswith("cls") else text


class _Sample:
  """Members of one WebDataset sample: its image members (bytes, or a read error for a member that is not a
  regular file) and its sidecars."""

  def __init__(self, key: str):
    self.key, self.meta, self.exts = key, {}, set()
    self.images: list[tuple[str, str, bytes | None, dict | None]] = []   # (ext, member, bytes, error)

  def rows(self, shard: Shard, uri: str) -> list[dict]:
    """One row per image member. A sample with one image is keyed by the sample key; with several (frames
    "k.0001.png", "k.0002.png", or "k.jpg" + "k.png") each row is keyed "<key>.<ext>", which no sample key can
    be (a sample key has no dot in its last path part). A sample without image gives one error row."""
    meta = json.dumps(self.meta, sort_keys=True, ensure_ascii=False, default=_json_default)
    if not self.images:
      return [make_row(self.key, shard.id, f"{uri}#{self.key}", None, meta,
                       read_error("NoImageMember", f"sample {self.key!r} has no member with an image "
                                  f"extension ({', '.join(IMAGE_EXTENSIONS)}); members: {sorted(self.exts)}"))]
    single = len(self.images) == 1
    return [make_row(self.key if single else f"{self.key}.{ext}", shard.id, f"{uri}#{member}", data, meta, err)
            for ext, member, data, err in self.images]


def _special_member(m: tarfile.TarInfo) -> str | None:
  """What a tar member that is neither a regular file nor a hard link nor a directory is (None otherwise)."""
  if m.issym():
    return f"symbolic link to {m.linkname!r} (links are not followed)"
  if m.isfifo():
    return "FIFO"
  if m.ischr() or m.isblk():
    return "device file"
  if m.isfile() or m.islnk() or m.isdir():
    return None
  return f"tar member of type {m.type!r}"


def _member_bytes(tar: tarfile.TarFile, m: tarfile.TarInfo, seen: dict[str, bytes]) -> bytes | dict:
  """A regular member's bytes, or a hard link's target's bytes (an earlier member: GNU tar stores a second
  name of a file as a link to the first), or the read error of a link whose target was not read."""
  if m.islnk():
    target = posixpath.normpath(m.linkname.lstrip("/"))
    if target in seen:
      return seen[target]
    return read_error("BrokenHardLink", f"member {m.name!r} is a hard link to {m.linkname!r}, which is not an "
                      "earlier regular member of the archive")
  data = tar.extractfile(m).read()
  if len(data) != m.size:
    raise tarfile.ReadError(f"member {m.name!r} truncated ({len(data)} of {m.size} bytes)")
  seen[posixpath.normpath(m.name.lstrip("/"))] = data
  return data


class _Raw:
  """The underlying (possibly remote) file; remembers whether a read of it failed (a transient I/O error, to
  propagate) as opposed to the decompressor above it failing on bad data."""

  def __init__(self, f):
    self.f, self.failed, self.head = f, False, b""

  def peek_head(self, n: int) -> bytes:
    """The first n bytes, served again by the next reads (no seek: works on non-seekable streams too)."""
    self.head = self.read(n)
    return self.head

  def read(self, size: int = -1) -> bytes:
    if self.head:
      if size is None or size < 0:
        out, self.head = self.head + self._read(-1), b""
      else:
        out, self.head = self.head[:size], self.head[size:]
        if len(out) < size:
          out += self._read(size - len(out))
      return out
    return self._read(size)

  def _read(self, size: int) -> bytes:
    try:
      return self.f.read(size)
    except BaseException:
      self.failed = True
      raise

  def readable(self) -> bool:
    return True

  def readinto(self, b) -> int:
    data = self.read(len(b))
    b[:len(data)] = data
    return len(data)


class _Recorder:
  """Read-only stream wrapper that counts the bytes read and keeps the last `keep` of them; errors of a
  decompressor become tarfile.ReadError (data errors), errors of the raw file propagate."""

  def __init__(self, f, raw: _Raw, keep: int = 4 * tarfile.RECORDSIZE):
    self.f, self.raw, self.n, self.tail, self.keep = f, raw, 0, b"", keep

  def read(self, size: int = -1) -> bytes:
    try:
      b = self.f.read(size)
    except Exception as e:  # noqa: BLE001 - sorted below
      if self.raw.failed or self.f is self.raw:
        raise
      raise tarfile.ReadError(f"corrupt compressed stream: {type(e).__name__}: {e}") from e
    self.n += len(b)
    self.tail = (self.tail + b)[-self.keep:]
    return b

  def at(self, pos: int, size: int) -> bytes:
    """Bytes [pos, pos + size) of the stream if still kept (b"" if not read or already dropped)."""
    start = self.n - len(self.tail)
    return self.tail[pos - start:pos - start + size] if pos >= start else b""


def _decompressing(raw: _Raw):
  """gzip / bz2 / xz streams by their magic bytes; plain tar as is."""
  import bz2  # pylint: disable=g-import-not-at-top
  import gzip  # pylint: disable=g-import-not-at-top
  import lzma  # pylint: disable=g-import-not-at-top
  head = raw.peek_head(6)
  if head.startswith(b"\x1f\x8b"):
    return gzip.GzipFile(fileobj=raw, mode="rb")
  if head.startswith(b"BZh"):
    return bz2.BZ2File(raw, mode="rb")
  if head.startswith(b"\xfd7zXZ\x00"):
    return lzma.LZMAFile(raw, mode="rb")
  return raw


def _check_end(tar: tarfile.TarFile, rec: _Recorder, last: str | None) -> None:
  """tarfile ends iteration silently on a truncated or garbled header after the first member; a complete
  archive ends with a zero block. Then reads to the end so that a compressed stream checks its CRC."""
  block = rec.at(tar.offset, tarfile.BLOCKSIZE)
  if len(block) != tarfile.BLOCKSIZE or block.count(0) != tarfile.BLOCKSIZE:
    after = f"after member {last!r}" if last else "at the start"
    raise tarfile.ReadError(f"no end-of-archive marker {after} (offset {tar.offset}): truncated or corrupt tar")
  while rec.read(1 << 20):
    pass


def read_webdataset(shard: Shard, storage_options: dict | None = None) -> Iterator[dict]:
  """Streams a tar (optionally gzip/bz2/xz compressed); consecutive members with the same key form a sample; a
  member whose extension the current sample already has starts a new sample (a duplicate key, flagged by
  dedupe_keys). Every image member gives a row (see `_Sample.rows`); hard links read their target's bytes;
  symlinks, FIFOs and devices are never read and give error rows. A tar that is cut short or garbled anywhere
  (also between members) ends in an error row."""
  uri = shard.uris[0]
  cur: _Sample | None = None
  last = None
  try:
    with _open(uri, storage_options) as f:
      raw = _Raw(f)
      rec = _Recorder(_decompressing(raw), raw)
      with tarfile.open(fileobj=rec, mode="r|") as tar:
        seen: dict[str, bytes] = {}   # member name -> bytes read (hard link targets); the rows hold them anyway
        for m in tar:
          last = m.name
          if m.isdir() or posixpath.basename(m.name).startswith("."):  # hidden: macOS "._x" resource forks
            continue
          key, ext = split_member(m.name)
          if cur is None or key != cur.key or ext in cur.exts:
            if cur is not None:
              yield from cur.rows(shard, uri)
            cur = _Sample(key)
          cur.exts.add(ext)
          special = _special_member(m)
          if special is not None:  # never read: an error row of its own, in place of an image
            cur.images.append((ext, m.name, None, read_error("UnsupportedMember", f"member {m.name!r} is a "
                                                             f"{special}; only regular files are read")))
            continue
          data = _member_bytes(tar, m, seen)
          if _is_image_ext(ext):
            err = data if isinstance(data, dict) else None
            cur.images.append((ext, m.name, None if err else data, err))
          elif isinstance(data, dict):
            cur.images.append((ext, m.name, None, data))
          elif ext in SIDECAR_EXTENSIONS or ext.rsplit(".", 1)[-1] in SIDECAR_EXTENSIONS:
            cur.meta[ext] = _sidecar(ext, data)
        _check_end(tar, rec, last)
  except DATA_ERRORS as e:
    # The sample in progress may be incomplete: it becomes the single error row for the rest of the shard.
    key = cur.key if cur is not None else SHARD_KEY
    yield _shard_error(shard, uri, e, key=key)
    return
  if cur is not None:
    yield from cur.rows(shard, uri)


# -- Parquet

def _json_default(v: Any) -> Any:
  if isinstance(v, (bytes, bytearray, memoryview)):
    return {"base64": base64.b64encode(bytes(v)).decode()} if len(v) <= 1024 else f"<{len(v)} bytes>"
  if isinstance(v, (datetime.datetime, datetime.date, datetime.time)):
    return v.isoformat()
  if isinstance(v, (datetime.timedelta,)):
    return v.total_seconds()
  if isinstance(v, decimal.Decimal):
    return str(v)
  if hasattr(v, "tolist"):
    return v.tolist()
  return str(v)


def _open_parquet(uri: str, storage_options: dict | None):
  """(ParquetFile, file object to close or None). Local files by path; remote through fsspec."""
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  fs, path = _fs(uri, storage_options)
  if is_local(fs):
    return pq.ParquetFile(path), None
  f = fs.open(path, "rb")
  try:
    return pq.ParquetFile(f), f
  except BaseException:
    f.close()
    raise


def _image_getter(field_type, column: str, uri: str):
  """A function cell -> (bytes | None, path | None) for a binary or struct<bytes, path> column."""
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  t = field_type
  if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t):
    return lambda v: (v, None)
  if pa.types.is_struct(t) and t.get_field_index("bytes") >= 0:
    has_path = t.get_field_index("path") >= 0
    return lambda v: (None, None) if v is None else (v.get("bytes"), v.get("path") if has_path else None)
  if pa.types.is_string(t) or pa.types.is_large_string(t):
    return lambda v: (None, v)
  raise TypeError(f"column {column!r} of {uri} has type {t}; expected binary, struct<bytes: binary, "
                  "path: string> (Hugging Face datasets Image) or string (a path/URL per row)")


def check_parquet_input(shard: Shard, image_column: str, storage_options: dict | None = None) -> None:
  """Before any work: the first Parquet shard has the image column, of a type the reader takes. A wrong column
  name or type would otherwise make every shard one error row. Raises InputColumnError naming the field."""
  uri = shard.uris[0]
  try:
    pf, f = _open_parquet(uri, storage_options)
  except DATA_ERRORS + (_arrow_error(),):
    return   # an unreadable file is that shard's own error row, not a job-level mistake
  try:
    names = pf.schema_arrow.names
    if image_column not in names:
      raise InputColumnError(f"input.image_column: no column {image_column!r} in {uri} (columns: "
                             f"{', '.join(names)})")
    try:
      _image_getter(pf.schema_arrow.field(image_column).type, image_column, uri)
    except TypeError as e:
      raise InputColumnError(f"input.image_column: {e}") from None
  finally:
    if f is not None:
      f.close()


def _read_source_row(key: str, shard: Shard, path: str, roots: tuple[str, ...] | None, storage_options: dict | None,
                     meta: str, source_uri: str) -> dict:
  """The row for an image cell that holds only a path: read if `sources.confine` allows it, else an error row
  (read/ForbiddenSource) without any request."""
  from pgbatch.io import sources  # pylint: disable=g-import-not-at-top
  try:
    target = sources.confine(path, shard.uris[0], roots or (sources.input_root(shard.uris[0]),))
  except sources.ForbiddenSource as e:
    return make_row(key, shard.id, source_uri, None, meta, read_error("ForbiddenSource", str(e)))
  opts = sources.storage_options_for(target, shard.uris[0], storage_options)
  return _read_file_row(key, shard, target, opts, meta, source_uri=source_uri)


def read_parquet(shard: Shard, image_column: str = "image", key_column: str | None = "key",
                 storage_options: dict | None = None, batch_size: int = 256,
                 allowed_roots: tuple[str, ...] | None = None) -> Iterator[dict]:
  """Rows of a Parquet file, streamed by record batches. Image cells that hold only a path (HF datasets with
  external files, or a string column) are read from that path (relative to the Parquet file's directory) when
  it is under `allowed_roots` (default: the Parquet file's folder), else they are read/ForbiddenSource error
  rows; a struct cell's path next to its bytes goes into metadata as "image_path"."""
  uri = shard.uris[0]
  roots = tuple(allowed_roots) if allowed_roots else None
  f = None
  index = 0
  try:
    pf, f = _open_parquet(uri, storage_options)
    names = pf.schema_arrow.names
    if image_column not in names:
      raise KeyError(f"no image column {image_column!r} in {uri}; columns: {names} (set input.image_column)")
    get_image = _image_getter(pf.schema_arrow.field(image_column).type, image_column, uri)
    use_key = key_column if key_column and key_column in names else None
    if key_column and use_key is None:
      log.warning("%s: no key column %r; keys are row numbers", uri, key_column)
    width = max(6, len(str(max(pf.metadata.num_rows - 1, 0))))
    meta_cols = [c for c in names if c not in (image_column, use_key)]
    for batch in pf.iter_batches(batch_size=batch_size, use_threads=False):
      cols = batch.to_pydict()
      for i in range(batch.num_rows):
        k = cols[use_key][i] if use_key else None
        key = (str(index).zfill(width) if not use_key else None) if k is None else str(k)  # None: fill_null_keys
        src = f"{uri}#row{index}"
        meta = json.dumps({c: cols[c][i] for c in meta_cols}, sort_keys=True, ensure_ascii=False,
                          default=_json_default)
        data, path = get_image(cols[image_column][i])
        if data is not None and path and "image_path" not in meta_cols:  # HF datasets: the original file name
          meta = meta[:-1] + ("," if meta != "{}" else "") + json.dumps({"image_path": path})[1:]
        index += 1
        if data is None and path:
          yield _read_source_row(key, shard, path, roots, storage_options, meta, src)
        elif data is None:
          yield make_row(key, shard.id, src, None, meta,
                         read_error("MissingImage", f"row {index - 1}: column {image_column!r} is null"))
        else:
          yield make_row(key, shard.id, src, bytes(data), meta)
  except DATA_ERRORS + (_arrow_error(),) as e:
    yield _shard_error(shard, uri, e, what=f"reading row {index} of" if index else "reading")
  finally:
    if f is not None:
      f.close()


def _arrow_error() -> type[BaseException]:
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  return pa.ArrowException


# -- image files

def _read_file_row(key: str, shard: Shard, uri: str, storage_options: dict | None, meta: str = "{}",
                   source_uri: str | None = None) -> dict:
  try:
    with _open(uri, storage_options) as f:
      data = f.read()
  except DATA_ERRORS as e:
    return make_row(key, shard.id, source_uri or uri, None, meta,
                    read_error(type(e).__name__, f"reading {uri}: {e}"))
  return make_row(key, shard.id, source_uri or uri, data, meta)


def _cat(fs: fsspec.AbstractFileSystem, path: str) -> bytes | BaseException:
  try:
    return fs.cat_file(path)
  except Exception as e:  # noqa: BLE001 - sorted into data vs transient errors by the caller
    return e


def read_images(shard: Shard, storage_options: dict | None = None) -> Iterator[dict]:
  """One row per file; key = the file name (unique within a directory chunk). On object stores files are
  fetched FETCH_CONCURRENCY at a time."""
  import concurrent.futures  # pylint: disable=g-import-not-at-top
  fs, _ = _fs(shard.uris[0], storage_options)
  paths = [_fs(u, storage_options)[1] for u in shard.uris]
  workers = 1 if is_local(fs) else FETCH_CONCURRENCY
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    for u, p, data in zip(shard.uris, paths, pool.map(lambda p: _cat(fs, p), paths)):
      key = posixpath.basename(p)
      if isinstance(data, DATA_ERRORS):
        yield make_row(key, shard.id, u, None, error=read_error(type(data).__name__, f"reading {u}: {data}"))
      elif isinstance(data, BaseException):
        raise data  # transient: let Ray retry the task
      else:
        yield make_row(key, shard.id, u, bytes(data))
