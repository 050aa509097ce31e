"""The Parquet sink: one file per input shard, committed atomically, with a manifest entry per committed shard.

Layout of an output URI (any fsspec URL):
    <output>/<name>.parquet             data, one file per input shard; name = output_name(shard id)
    <output>/_manifest/<name>.json      the commit marker = the manifest entry of that shard
    <output>/_tmp/                      local temporaries (only on local filesystems)

Commit protocol (the marker is the commit point):
- local: write <output>/_tmp/<name>.<uuid>.tmp, fsync, os.replace onto <output>/<name>.parquet (atomic on one
  filesystem), then the marker the same way.
- object stores: upload <output>/<name>.parquet (a single object upload is atomic: it is either absent or
  complete), then upload the marker, which records the data object's size (and GCS generation).
A shard is committed only when its marker parses and the data file it names exists with the recorded size
(and generation). A run killed at any point leaves at worst a temp file or a data file without a valid marker:
`cleanup()` deletes those, and the shard is rewritten (same name) by the rerun. Readers that must never see
uncommitted data should list files through `read_manifest` (or run after the job finished); `_`-prefixed
paths are ignored by pyarrow datasets, DuckDB globs of "*.parquet" and Spark.
One job at a time per output URI (cleanup deletes what another live run has not committed yet).
"""
from __future__ import annotations

import collections
import concurrent.futures
import datetime
import hashlib
import json
import logging
import os
import posixpath
import re
import time
import uuid

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from pgbatch.fsutil import is_local
from pgbatch.io.readers import _json_default, to_uri

log = logging.getLogger(__name__)

MANIFEST_DIR = "_manifest"
TMP_DIR = "_tmp"
MANIFEST_VERSION = 1
DATA_SUFFIX = ".parquet"
_DATA_NAME = re.compile(r"^.+-[0-9a-f]{12}\.parquet$")
_SHARD_SUFFIXES = (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar", ".parquet", ".pq")
# Entry keys the sink computes; caller stats cannot override them.
_OWN_KEYS = ("shard", "file", "name", "rows", "ok", "error", "filtered", "errors", "size", "generation",
             "schema_version", "pgbatch_version", "manifest_version", "committed_at", "write_seconds", "sources",
             "input")


def output_name(shard_id: str) -> str:
  """Deterministic, readable, unique file name: "<safe basename>-<sha1(id)[:12]>.parquet".
  "gs://b/x/shard-000.tar" -> "shard-000-<hash>.parquet"; "/d/img1.jpg+1000" -> "img1.jpg_1000-<hash>.parquet"."""
  base = shard_id.rstrip("/").rsplit("/", 1)[-1]
  for suf in _SHARD_SUFFIXES:
    if base.lower().endswith(suf):
      base = base[:-len(suf)]
      break
  safe = re.sub(r"[^A-Za-z0-9._-]+", "_", base).strip("._-")[:80] or "shard"
  return f"{safe}-{hashlib.sha1(shard_id.encode()).hexdigest()[:12]}{DATA_SUFFIX}"


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


def _version() -> str:
  from pgbatch import __version__  # pylint: disable=g-import-not-at-top
  return __version__




def conform(table: pa.Table, schema: pa.Schema | None, what: str = "table") -> pa.Table:
  """Columns of `schema` in its order, cast to its types (missing nullable columns become nulls; extra columns
  are dropped), rows sorted by key."""
  if schema is not None:
    cols = []
    for f in schema:
      if f.name in table.column_names:
        col = table[f.name]
        if col.type != f.type:
          try:
            col = col.cast(f.type)
          except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
            raise ValueError(f"{what}: column {f.name!r} of type {col.type} does not fit the output type "
                             f"{f.type}: {e}") from e
        if not f.nullable and col.null_count:
          raise ValueError(f"{what}: column {f.name!r} has {col.null_count} nulls but is required")
        cols.append(col)
      elif f.nullable:
        # (pa.array, not pa.nulls: null structs need valid children where those are declared not null)
        cols.append(pa.array([None] * table.num_rows, type=f.type))
      else:
        raise ValueError(f"{what}: required column {f.name!r} is missing (columns: {table.column_names})")
    table = pa.Table.from_arrays(cols, schema=schema)
  if "key" in table.column_names and table.num_rows > 1:
    table = table.sort_by("key")
  return table


def _counts(table: pa.Table) -> tuple[dict, dict]:
  """({ok, error, filtered}, {"<stage>/<type>": n}) of a conformed table."""
  status = table["status"].to_pylist() if "status" in table.column_names else []
  c = collections.Counter(status)
  counts = {"ok": c.get("ok", 0), "error": c.get("error", 0), "filtered": c.get("filtered", 0)}
  reasons: collections.Counter = collections.Counter()
  if "error" in table.column_names:
    for s, e in zip(status, table["error"].to_pylist()):
      if s == "error" and e is not None:
        reasons[f"{e.get('stage')}/{e.get('type')}"] += 1
  return counts, dict(sorted(reasons.items()))


def _cat_many(fs, paths: list[str]) -> list[bytes | BaseException]:
  def one(p):
    try:
      return fs.cat_file(p)
    except Exception as e:  # noqa: BLE001 - reported per file
      return e
  if is_local(fs) or len(paths) < 2:
    return [one(p) for p in paths]
  with concurrent.futures.ThreadPoolExecutor(16) as pool:
    return list(pool.map(one, paths))


class Sink:
  """Writes committed shards under `output_uri` (see the module doc). Not thread-safe; the driver owns it."""

  def __init__(self, output_uri: str, schema: pa.Schema | None = None, storage_options: dict | None = None, *,
               job: str | None = None, compression: str = "zstd"):
    self.output_uri = output_uri
    self.schema = schema
    self.job = job
    self.compression = compression
    self.fs, root = fsspec.core.url_to_fs(output_uri, **(storage_options or {}))
    self.root = root.rstrip("/") or root
    self.local = is_local(self.fs)

  # -- paths

  def _p(self, *parts: str) -> str:
    return posixpath.join(self.root, *parts)

  def uri(self, path: str) -> str:
    return to_uri(self.fs, path)

  def marker_path(self, name: str) -> str:
    return self._p(MANIFEST_DIR, name[:-len(DATA_SUFFIX)] + ".json")

  # -- listing

  def _ls(self, path: str) -> list[dict]:
    self.fs.invalidate_cache(path)
    try:
      return [i for i in self.fs.ls(path, detail=True) if i.get("type") != "directory"]
    except FileNotFoundError:
      return []

  def _data_files(self) -> dict[str, dict]:
    """name -> fs info of the data files (names that output_name can produce) directly under the output."""
    return {posixpath.basename(i["name"]): i for i in self._ls(self.root)
            if _DATA_NAME.match(posixpath.basename(i["name"]))}

  def _markers(self) -> dict[str, dict | None]:
    """marker path -> parsed entry (None when unreadable)."""
    paths = sorted(i["name"] for i in self._ls(self._p(MANIFEST_DIR)) if i["name"].endswith(".json"))
    out: dict[str, dict | None] = {}
    for p, data in zip(paths, _cat_many(self.fs, paths)):
      try:
        if isinstance(data, BaseException):
          raise data
        e = json.loads(data)
        out[p] = e if isinstance(e, dict) and "shard" in e and "name" in e else None
      except (ValueError, OSError) as exc:
        log.warning("unreadable manifest entry %s: %r", p, exc)
        out[p] = None
    return out

  @staticmethod
  def _valid(entry: dict | None, info: dict | None) -> bool:
    if entry is None or info is None:
      return False
    if int(info.get("size", -1)) != entry.get("size"):
      return False
    gen, want = info.get("generation"), entry.get("generation")
    return gen is None or want is None or str(gen) == str(want)

  def _scan(self) -> tuple[dict[str, dict], list[str]]:
    """(shard id -> valid entry, paths of invalid markers and unmarked data files)."""
    data = self._data_files()
    valid: dict[str, dict] = {}
    stale: list[str] = []
    marked: set[str] = set()
    for path, e in self._markers().items():
      info = data.get(e["name"]) if e else None
      if self._valid(e, info) and path == self.marker_path(e["name"]):
        valid[e["shard"]] = e
        marked.add(e["name"])
      else:
        stale.append(path)
    stale += [i["name"] for n, i in sorted(data.items()) if n not in marked]
    return valid, stale

  def committed(self) -> dict[str, dict]:
    """shard id -> manifest entry, for the shards whose marker is valid (data present, same size/generation)."""
    return self._scan()[0]

  def cleanup(self) -> list[str]:
    """Deletes leftovers of killed runs: temp files, markers that are not valid, data files without a valid
    marker. Returns their URIs."""
    _, stale = self._scan()
    tmp = self._p(TMP_DIR)
    if self.fs.exists(tmp):
      stale += sorted(self.fs.find(tmp))
    for p in stale:
      try:
        self.fs.rm_file(p)
        log.info("removed leftover %s", p)
      except FileNotFoundError:
        pass
    if self.local and self.fs.exists(tmp):
      try:
        os.rmdir(tmp)
      except OSError:
        pass
    self.fs.invalidate_cache(self.root)
    return [self.uri(p) for p in stale]

  def probe_writable(self) -> None:
    """Writes and deletes a probe object under the output (before any work); `errors.OutputError` naming
    output.uri if that fails."""
    from pgbatch.errors import OutputError  # pylint: disable=g-import-not-at-top
    path = self._p(f"_probe-{uuid.uuid4().hex[:12]}")
    try:
      if self.local:
        os.makedirs(self.root, exist_ok=True)
      self.fs.pipe_file(path, b"pgbatch write probe")
      self.fs.rm_file(path)
    except Exception as e:  # noqa: BLE001 - any backend's permission / not-found / read-only error
      raise OutputError(f"output.uri: cannot write to {self.output_uri}: {type(e).__name__}: {e}") from None

  # -- writing

  def _put_local(self, final: str, write) -> None:
    tmp = self._p(TMP_DIR, f"{posixpath.basename(final)}.{uuid.uuid4().hex}.tmp")
    os.makedirs(os.path.dirname(tmp), exist_ok=True)
    os.makedirs(os.path.dirname(final), exist_ok=True)
    try:
      with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
      os.replace(tmp, final)
      try:
        os.rmdir(os.path.dirname(tmp))  # leave no empty _tmp behind; fails harmlessly while others exist
      except OSError:
        pass
    except BaseException:
      if os.path.exists(tmp):
        os.unlink(tmp)
      raise

  def write_data(self, name: str, table: pa.Table) -> dict:
    """Writes the data file into place (atomically); returns its fs info (size, generation ...)."""
    path = self._p(name)
    if self.local:
      self._put_local(path, lambda f: pq.write_table(table, f, compression=self.compression))
    else:
      with self.fs.open(path, "wb") as f:
        pq.write_table(table, f, compression=self.compression)
    self.fs.invalidate_cache(self.root)
    return self.fs.info(path)

  def write_marker(self, name: str, entry: dict) -> None:
    body = json.dumps(entry, indent=1, sort_keys=True, default=_json_default).encode()
    path = self.marker_path(name)
    if self.local:
      self._put_local(path, lambda f: f.write(body))
    else:
      self.fs.pipe_file(path, body)
    self.fs.invalidate_cache(self._p(MANIFEST_DIR))

  def commit_shard(self, shard_id: str, table: pa.Table, stats: dict | None = None, *,
                   sources: list[str] | None = None, input_version: dict | None = None) -> str:
    """Writes `table` (conformed to the schema, sorted by key) as the shard's file, then its marker.
    `stats` (e.g. seconds, images_per_s, read_seconds) go into the manifest entry, and so do `sources` (the
    image files an image-files shard holds: the next run skips exactly those) and `input_version` (the input
    object's size / generation / etag / mtime as listed: a later change is detected). Returns the data file URI."""
    t0 = time.perf_counter()
    name = output_name(shard_id)
    table = conform(table, self.schema, what=f"shard {shard_id}")
    counts, reasons = _counts(table)
    info = self.write_data(name, table)
    meta = (self.schema or table.schema).metadata or {}
    from pgbatch import schema as schema_mod  # pylint: disable=g-import-not-at-top
    entry = {k: v for k, v in (stats or {}).items() if k not in _OWN_KEYS}
    entry.update(
        shard=shard_id, file=self.uri(self._p(name)), name=name, rows=table.num_rows, **counts, errors=reasons,
        size=int(info["size"]),
        schema_version=meta.get(schema_mod.META_VERSION, schema_mod.SCHEMA_VERSION.encode()).decode(),
        pgbatch_version=_version(), manifest_version=MANIFEST_VERSION, job=self.job if self.job else entry.get("job"),
        committed_at=_now(), write_seconds=round(time.perf_counter() - t0, 4))
    if info.get("generation") is not None:
      entry["generation"] = str(info["generation"])
    if sources is not None:
      entry["sources"] = list(sources)
    if input_version:
      entry["input"] = dict(input_version)
    entry.setdefault("seconds", entry["write_seconds"])
    self.write_marker(name, entry)
    return entry["file"]


def committed_sources(entries: dict[str, dict], storage_options: dict | None = None) -> set[str]:
  """The image file URIs the committed shards hold: each entry's `sources`, or for entries written without
  them (older versions) the distinct `source_uri` values of the committed file."""
  out: set[str] = set()
  for e in entries.values():
    if isinstance(e.get("sources"), list):
      out.update(e["sources"])
      continue
    fs, path = fsspec.core.url_to_fs(e["file"], **(storage_options or {}))
    with fs.open(path, "rb") as f:
      col = pq.read_table(f, columns=["source_uri"]).column("source_uri").to_pylist()
    out.update(u for u in col if u)
  return out


def read_manifest(output_uri: str, storage_options: dict | None = None) -> list[dict]:
  """The manifest entries of the committed shards under `output_uri`, sorted by shard id (for `pgbatch
  inspect`). Invalid markers (killed runs) are left out."""
  entries = Sink(output_uri, None, storage_options).committed()
  return [entries[k] for k in sorted(entries)]
