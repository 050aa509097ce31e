"""What a run must do so that every input image is in the output exactly once: the listing against the manifest.

    work = resume.plan(fmt, shards, committed, files_per_shard, retry_errors=..., redo_changed=...)
    work.todo          shards to read; work.skip_keys[id]: keys a retried shard keeps from its committed file
    work.changed       committed tar/Parquet shards whose input object changed since commit (size/generation/etag)

- Tar / Parquet: a shard is its file; it is done when committed. A committed shard whose listed object version
  differs from the one recorded at commit is *changed*: reported, and redone with `redo_changed`.
- Image files: an image is done when a committed shard holds it (manifest `sources`); the images not done are
  grouped into new shards (`readers.image_shards`): a growing folder costs exactly its new images.
- `retry_errors`: committed shards with error rows are read again; only their error rows are re-annotated
  (`skip_keys` are the others), and the commit merges the kept rows back (`merge_retried`).
A redone shard is rewritten under its own name: data file, then marker (the marker stays the commit point).
"""
from __future__ import annotations

import dataclasses

import pyarrow as pa
import pyarrow.compute as pc

from pgbatch.io import readers, sink as sink_lib


@dataclasses.dataclass
class Work:
  todo: list = dataclasses.field(default_factory=list)            # readers.Shard to read
  skip_keys: dict = dataclasses.field(default_factory=dict)       # shard id -> keys kept from the committed file
  changed: list = dataclasses.field(default_factory=list)         # (shard id, [changed version fields])
  done: int = 0                                                   # committed shards left as they are
  retried: dict = dataclasses.field(default_factory=dict)         # shard id -> its committed manifest entry


def plan(fmt: str, shards: list, committed: dict[str, dict], files_per_shard: int, *, retry_errors: bool = False,
         redo_changed: bool = False, storage_options: dict | None = None) -> Work:
  """The shards to read for `shards` (the listing) given the `committed` manifest entries (see the module doc)."""
  work = Work()
  listed = {s.id: s for s in shards}
  redo: dict[str, readers.Shard] = {}
  for sid, entry in committed.items():
    shard = listed.get(sid)
    if fmt != "images" and shard is not None:
      diff = readers.version_changed(entry.get("input"), shard.version)
      if diff:
        work.changed.append((sid, diff))
        if redo_changed:
          redo[sid] = shard
          continue
    if retry_errors and int(entry.get("error") or 0) > 0:
      uris = tuple(entry.get("sources") or ()) if fmt == "images" else (sid,)
      if uris:
        redo[sid] = shard or readers.Shard(sid, uris)
        work.skip_keys[sid] = kept_keys(entry, storage_options)
        work.retried[sid] = entry
  if fmt == "images":
    done = sink_lib.committed_sources(committed, storage_options)
    new = readers.image_shards([u for s in shards for u in s.uris], files_per_shard, done)
    clash = [s.id for s in new if s.id in committed]   # impossible: a new shard's first image is not done
    if clash:
      raise RuntimeError(f"new image shards would reuse committed ids: {clash[:3]}")
  else:
    new = [s for s in shards if s.id not in committed]
  work.todo = list(redo.values()) + new
  work.done = len(committed) - len(redo)
  return work


def kept_keys(entry: dict, storage_options: dict | None = None) -> list[str]:
  """Keys of the rows of a committed shard that are not errors (a retry keeps them as they are)."""
  t = _read(entry, ["key", "status"], storage_options)
  return t.filter(pc.not_equal(t["status"], "error"))["key"].to_pylist()


def merge_retried(entry: dict, new: pa.Table, schema: pa.Schema, storage_options: dict | None = None) -> pa.Table:
  """The committed file's rows that are not errors (unless `new` has their key) plus the new rows."""
  old = _read(entry, None, storage_options)
  keep = pc.and_(pc.not_equal(old["status"], "error"),
                 pc.invert(pc.is_in(old["key"], value_set=new["key"].combine_chunks())))
  old = sink_lib.conform(old.filter(keep), schema, what=f"shard {entry['shard']}")
  return pa.concat_tables([old, sink_lib.conform(new, schema, what=f"shard {entry['shard']}")])


def _read(entry: dict, columns: list[str] | None, storage_options: dict | None) -> pa.Table:
  import fsspec
  import pyarrow.parquet as pq
  fs, path = fsspec.core.url_to_fs(entry["file"], **(storage_options or {}))
  with fs.open(path, "rb") as f:
    return pq.read_table(f, columns=columns)
