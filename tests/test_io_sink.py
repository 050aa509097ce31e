"""Sink: deterministic names, atomic commit + marker, resume (committed), cleanup after killed runs; read back
with pyarrow and DuckDB; local and gs:// (emulator)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from pgbatch import rows
from pgbatch import schema as schema_mod
from pgbatch import schema_docs
from pgbatch.io import sink as sink_mod
from pgbatch.io.sink import Sink, output_name, read_manifest

SHARDS = ["gs://in/shards/shard-000.tar", "gs://in/shards/shard-001.tar", "gs://in/other/shard-000.tar"]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def schema():
  return schema_mod.output_schema(schema_docs.canonical_tasks())


def shard_table(shard: str, n: int = 3) -> pa.Table:
  """Rows in reverse key order (the sink sorts), one decode error (the `rows.error` struct)."""
  keys = [f"{shard}-{i:02d}" for i in range(n)][::-1]
  err = rows.error("decode", "TruncatedImageError", "cut")
  return pa.table({
      "key": keys, "shard": [shard] * n, "source_uri": [f"{shard}#{k}.jpg" for k in keys],
      "status": ["error"] + ["ok"] * (n - 2) + ["filtered"],
      "error": pa.array([err] + [None] * (n - 1), rows.ERROR_TYPE),
      "width": pa.array([640] * n, pa.int64()), "height": [480] * n, "sha256": ["ab" * 32] * n,
      "caption_en": pa.array([None] + [{"text": f"cap {k}", "prompt": "caption en", "num_tokens": 3,
                                         "truncated": False} for k in keys[1:]],
                             schema_mod.output_schema(schema_docs.canonical_tasks()).field("caption_en").type),
      "pixels": [b"internal"] * n})  # not in the schema: dropped


def test_output_name():
  a = output_name("gs://b/x/shard-000.tar")
  assert a == output_name("gs://b/x/shard-000.tar") and a.startswith("shard-000-") and a.endswith(".parquet")
  assert a != output_name("gs://b/y/shard-000.tar")  # same basename, other shard: other name
  assert output_name("/d/pq/part 7.parquet").startswith("part_7-")
  assert output_name("gs://b/imgs/IMG 1.jpg+1000").startswith("IMG_1.jpg_1000-")
  assert output_name("gs://b/x/shard.tar.gz").startswith("shard-")
  n = output_name("s3://b/" + "ü" * 300)
  assert len(n) < 120 and sink_mod._DATA_NAME.match(n)


def test_commit_read_back_pyarrow_duckdb(tmp_path, schema):
  out = str(tmp_path / "out")
  s = Sink(out, schema, job="nightly-1")
  assert s.committed() == {} and s.cleanup() == [] and read_manifest(out) == []
  stats = {"seconds": 2.5, "images_per_s": np.float32(1.25), "rows": 999, "n": np.int64(7)}
  uris = [s.commit_shard(sh, shard_table(sh), stats) for sh in SHARDS]
  assert uris == [os.path.join(out, output_name(sh)) for sh in SHARDS]
  assert sorted(os.listdir(out)) == sorted([output_name(sh) for sh in SHARDS] + ["_manifest"])
  c = s.committed()
  assert set(c) == set(SHARDS)
  e = c[SHARDS[0]]
  assert e["rows"] == 3 and (e["ok"], e["error"], e["filtered"]) == (1, 1, 1)  # caller's "rows" ignored
  assert e["errors"] == {"decode/TruncatedImageError": 1} and e["seconds"] == 2.5 and e["images_per_s"] == 1.25
  assert e["n"] == 7
  assert e["job"] == "nightly-1" and e["schema_version"] == "1" and e["pgbatch_version"]
  assert e["size"] == os.path.getsize(uris[0]) and e["file"] == uris[0] and e["committed_at"].endswith("+00:00")
  assert [m["shard"] for m in read_manifest(out)] == sorted(SHARDS)

  t = pq.read_table(uris[0])
  assert t.schema.equals(schema, check_metadata=False) and t.schema.metadata == schema.metadata
  assert t["key"].to_pylist() == sorted(t["key"].to_pylist())
  rows = {r["status"]: r for r in t.to_pylist()}
  assert rows["error"]["error"] == {"stage": "decode", "type": "TruncatedImageError", "message": "cut"}
  assert rows["error"]["width"] == 640 and rows["error"]["caption_en"] is None and rows["ok"]["error"] is None
  assert rows["ok"]["caption_en"]["text"].startswith("cap ") and rows["ok"]["provenance"] is None
  # whole output as a dataset: _manifest is ignored, each input row once
  dset = ds.dataset(out, format="parquet").to_table()
  assert dset.num_rows == 9 and len(set(dset["key"].to_pylist())) == 9
  con = duckdb.connect()
  got = con.execute(f"select status, count(*) from read_parquet('{out}/*.parquet') group by 1 order by 1").fetchall()
  assert got == [("error", 3), ("filtered", 3), ("ok", 3)]
  assert con.execute(f"select error.type from read_parquet('{out}/*.parquet') where status = 'error' "
                     "limit 1").fetchone() == ("TruncatedImageError",)
  # recommitting a shard replaces it (same name), never duplicates
  s.commit_shard(SHARDS[0], shard_table(SHARDS[0], 5), {})
  assert ds.dataset(out, format="parquet").count_rows() == 11 and s.committed()[SHARDS[0]]["rows"] == 5


def test_conform_errors(tmp_path, schema):
  s = Sink(str(tmp_path), schema)
  with pytest.raises(ValueError, match="required column 'status' is missing"):
    s.commit_shard("x", pa.table({"key": ["a"], "shard": ["x"]}), {})
  with pytest.raises(ValueError, match="column 'width' of type string"):
    s.commit_shard("x", pa.table({"key": ["a"], "shard": ["x"], "status": ["ok"], "width": ["wide"]}), {})
  with pytest.raises(ValueError, match="'key' has 1 nulls"):
    s.commit_shard("x", pa.table({"key": [None], "shard": ["x"], "status": ["ok"]}), {})
  assert s.committed() == {} and not any(n.endswith(".parquet") for n in os.listdir(tmp_path))


def test_invalid_markers_and_cleanup(tmp_path, schema):
  out = str(tmp_path)
  s = Sink(out, schema)
  for sh in SHARDS:
    s.commit_shard(sh, shard_table(sh), {})
  n0, n1, n2 = (output_name(sh) for sh in SHARDS)
  m = lambda n: os.path.join(out, "_manifest", n.replace(".parquet", ".json"))  # noqa: E731
  # shard 0: data file replaced by other content (size differs) -> not committed
  pq.write_table(pa.table({"key": ["zzz"] * 50}), os.path.join(out, n0))
  # shard 1: data file gone -> marker not valid
  os.unlink(os.path.join(out, n1))
  # unreadable marker, a temp file of a killed write, a foreign parquet file (left alone)
  with open(os.path.join(out, "_manifest", "junk-0123456789ab.json"), "w") as f:
    f.write('{"shard": "x", "na')
  os.makedirs(os.path.join(out, "_tmp"), exist_ok=True)
  with open(os.path.join(out, "_tmp", n2 + ".deadbeef.tmp"), "wb") as f:
    f.write(b"PAR1 partial")
  pq.write_table(pa.table({"a": [1]}), os.path.join(out, "users-own-file.parquet"))
  assert set(s.committed()) == {SHARDS[2]}
  removed = s.cleanup()
  assert sorted(os.path.basename(p) for p in removed) == sorted(
      [os.path.basename(m(n0)), os.path.basename(m(n1)), "junk-0123456789ab.json", n0, n2 + ".deadbeef.tmp"])
  assert sorted(os.listdir(out)) == sorted([n2, "_manifest", "users-own-file.parquet"])
  assert os.listdir(os.path.join(out, "_manifest")) == [os.path.basename(m(n2))]
  assert set(s.committed()) == {SHARDS[2]} and s.cleanup() == []


CRASH_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {repo!r})
    import pyarrow.parquet as pq
    from pgbatch import schema as schema_mod, schema_docs
    from pgbatch.io import sink as sink_mod
    from tests.test_io_sink import SHARDS, shard_table
    where = sys.argv[1]
    s = sink_mod.Sink({out!r}, schema_mod.output_schema(schema_docs.canonical_tasks()))
    s.commit_shard(SHARDS[0], shard_table(SHARDS[0]), {{}})
    die = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
    if where == "marker":     # data file in place, marker never written
      sink_mod.Sink.write_marker = die
    else:                     # half of the data file written to the temp name, then killed
      def partial(table, f, **kw):
        f.write(b"PAR1" + b"x" * 1000); f.flush(); die()
      sink_mod.pq.write_table = partial
    s.commit_shard(SHARDS[1], shard_table(SHARDS[1]), {{}})
    print("not killed")
""")


@pytest.mark.parametrize("where", ["marker", "data"])
def test_sigkill_mid_commit_then_resume(tmp_path, schema, where):
  out = str(tmp_path / "out")
  proc = subprocess.run([sys.executable, "-c", CRASH_SCRIPT.format(repo=REPO, out=out), where],
                        capture_output=True, text=True, timeout=120, cwd=REPO)
  assert proc.returncode == -9, proc.stderr[-2000:]
  s = Sink(out, schema)
  assert set(s.committed()) == {SHARDS[0]}
  if where == "marker":
    leftovers = [os.path.join(out, output_name(SHARDS[1]))]
  else:
    leftovers = [os.path.join(out, "_tmp", n) for n in os.listdir(os.path.join(out, "_tmp"))]
  assert len(leftovers) == 1 and os.path.exists(leftovers[0])
  if where == "marker":  # the unmarked file is visible to a glob until cleanup: the rerun's cleanup removes it
    assert ds.dataset(out, format="parquet").count_rows() == 6
  assert s.cleanup() == leftovers
  assert ds.dataset(out, format="parquet").count_rows() == 3
  # the rerun writes only what is not committed
  todo = [sh for sh in SHARDS if sh not in s.committed()]
  assert todo == SHARDS[1:]
  for sh in todo:
    s.commit_shard(sh, shard_table(sh), {})
  keys = ds.dataset(out, format="parquet").to_table()["key"].to_pylist()
  assert len(keys) == 9 == len(set(keys)) and set(s.committed()) == set(SHARDS)
  assert not os.path.exists(os.path.join(out, "_tmp")) or not os.listdir(os.path.join(out, "_tmp"))


def test_gcs_commit_resume_cleanup(gcs, schema, monkeypatch):
  fs, bucket = gcs
  out = f"gs://{bucket}/sink/out"
  s = Sink(out + "/", schema, job="j")
  assert s.committed() == {} and s.cleanup() == []
  uri = s.commit_shard(SHARDS[0], shard_table(SHARDS[0]), {"seconds": 1.0})
  assert uri == f"{out}/{output_name(SHARDS[0])}"
  e = s.committed()[SHARDS[0]]
  assert e["generation"] and e["size"] == fs.info(uri)["size"]
  t = pq.read_table(uri, filesystem=fs, use_threads=False)
  assert t.num_rows == 3 and t["key"].to_pylist() == sorted(t["key"].to_pylist())
  assert [r["error"]["type"] for r in t.to_pylist() if r["status"] == "error"] == ["TruncatedImageError"]

  # crash between the data upload and the marker: data object exists, shard not committed
  def crash(*a, **k):
    raise KeyboardInterrupt("killed")
  monkeypatch.setattr(Sink, "write_marker", crash)
  with pytest.raises(KeyboardInterrupt):
    s.commit_shard(SHARDS[1], shard_table(SHARDS[1]), {})
  monkeypatch.undo()
  assert fs.exists(f"{out}/{output_name(SHARDS[1])}")
  s2 = Sink(out, schema)  # a rerun
  assert set(s2.committed()) == {SHARDS[0]}
  assert s2.cleanup() == [f"{out}/{output_name(SHARDS[1])}"]
  assert not fs.exists(f"{out}/{output_name(SHARDS[1])}")
  s2.commit_shard(SHARDS[1], shard_table(SHARDS[1]), {})
  assert set(s2.committed()) == set(SHARDS[:2])
  # a data object rewritten after its marker (new generation) is no longer committed
  data = fs.cat(uri)
  fs.pipe(uri, data)
  assert set(Sink(out, schema).committed()) == {SHARDS[1]}
  assert [m["shard"] for m in read_manifest(out)] == [SHARDS[1]]
