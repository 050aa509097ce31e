"""Reruns that fix what went wrong, through `pgbatch run` on a local Ray, Parquet read back after each:

- a misnamed image column fails before any work (exit 2, names input.image_column); the corrected run
  annotates everything;
- `--retry-errors` after a transient failure (an image file that was missing) turns those rows ok, rewriting
  only the affected shard, keeping its other rows as they were;
- a committed shard whose input file changed is reported by `run` and `inspect`, and redone by
  `--redo-changed`;
- a second run while another holds the output is refused (exit 2) and writes nothing.
"""
import hashlib
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pgbatch import cli, demo, inspection
from pgbatch.io import lease, sink
from tests import pipeline_helpers as H


def _digest(path) -> str:
  return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _rows(out) -> dict:
  _, tables = H.read_output(str(out) + "/")
  return {(r["shard"].rsplit("/", 1)[-1], r["key"]): r for t in tables.values() for r in t.to_pylist()}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("rerun")
  ckpt, tok = H.tiny_model(tmp / "model")
  photos = [b for k, b, _, _ in demo.samples() if k != demo.BROKEN_KEY]
  (tmp / "in" / "img").mkdir(parents=True)
  for i, name in enumerate(["a", "b", "c", "d"]):
    (tmp / "in" / "img" / f"{name}.jpg").write_bytes(photos[i % len(photos)])
  # image cells are paths relative to the Parquet file; "e.jpg" does not exist yet (a transient outage)
  pq.write_table(pa.table({"key": ["a", "b"], "img": ["img/a.jpg", "img/b.jpg"]}), str(tmp / "in" / "p0.parquet"))
  pq.write_table(pa.table({"key": ["d", "e"], "img": ["img/d.jpg", "img/e.jpg"]}), str(tmp / "in" / "p1.parquet"))
  spec = H.job("rerun", str(tmp / "in" / "*.parquet"), str(tmp / "out") + "/", ckpt, tok, fmt="parquet",
               fast_safety=True, tasks=[{"name": "caption_en", "kind": "caption", "lang": "en", "max_new_tokens": 2}],
               input={"uri": str(tmp / "in" / "*.parquet"), "format": "parquet", "image_column": "image"})
  (tmp / "wrong.yaml").write_text(json.dumps(spec))
  spec["input"]["image_column"] = "img"
  (tmp / "job.yaml").write_text(json.dumps(spec))
  with H.local_ray():
    yield dict(tmp=tmp, out=tmp / "out", photos=photos)


def test_misnamed_image_column_fails_before_work_then_corrected_run_annotates_all(setup, capsys):
  assert cli.main(["run", str(setup["tmp"] / "wrong.yaml"), "--no-progress"]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "input.image_column" in err and "'image'" in err and "img" in err, err
  assert not setup["out"].exists() or not any(setup["out"].iterdir())
  assert cli.main(["run", str(setup["tmp"] / "job.yaml"), "--no-progress"]) == 0
  got = _rows(setup["out"])
  assert sorted(got) == [("p0.parquet", "a"), ("p0.parquet", "b"), ("p1.parquet", "d"), ("p1.parquet", "e")]
  assert [got[k]["status"] for k in sorted(got)] == ["ok", "ok", "ok", "error"]
  assert got[("p1.parquet", "e")]["error"]["type"] == "FileNotFoundError"


def test_retry_errors_fixes_only_the_error_rows(setup, capsys):
  out = setup["out"]
  before = _rows(out)
  entries = {e["shard"].rsplit("/", 1)[-1]: e for e in sink.read_manifest(str(out) + "/")}
  p0_bytes = _digest(entries["p0.parquet"]["file"])
  (setup["tmp"] / "in" / "img" / "e.jpg").write_bytes(setup["photos"][0])   # the outage is over
  assert cli.main(["run", str(setup["tmp"] / "job.yaml"), "--no-progress"]) == 0   # a plain rerun: nothing to do
  assert "0 images" in capsys.readouterr().out
  assert cli.main(["run", str(setup["tmp"] / "job.yaml"), "--no-progress", "--retry-errors"]) == 0
  assert "1 images (ok 1, error 0, filtered 0) in 1/2 shards, 1 already done" in capsys.readouterr().out
  after = _rows(out)
  assert sorted(after) == sorted(before) and all(r["status"] == "ok" for r in after.values())
  assert _digest(entries["p0.parquet"]["file"]) == p0_bytes                  # the other shard: untouched
  kept, fixed = after[("p1.parquet", "d")], after[("p1.parquet", "e")]
  assert kept["provenance"]["job_id"] == before[("p1.parquet", "d")]["provenance"]["job_id"]   # not redone
  assert fixed["provenance"]["job_id"] != kept["provenance"]["job_id"] and fixed["caption_en"] is not None
  e1 = {e["shard"].rsplit("/", 1)[-1]: e for e in sink.read_manifest(str(out) + "/")}["p1.parquet"]
  assert (e1["rows"], e1["ok"], e1["error"]) == (2, 2, 0)


def test_changed_input_is_reported_and_redone_on_request(setup, capsys):
  out, tmp = setup["out"], setup["tmp"]
  p0 = tmp / "in" / "p0.parquet"
  pq.write_table(pa.table({"key": ["a", "b", "c"], "img": ["img/a.jpg", "img/b.jpg", "img/c.jpg"]}), str(p0))
  assert cli.main(["run", str(tmp / "job.yaml"), "--no-progress"]) == 0
  err = capsys.readouterr().err
  assert "1 committed shard(s) changed in the input" in err and "p0.parquet" in err and "--redo-changed" in err
  rep = inspection.summarize(str(out) + "/", input_uri=str(tmp / "in" / "*.parquet"), input_format="parquet")
  assert [c["shard"] for c in rep["exactly_once"]["changed_shards"]] == [str(p0)]
  assert cli.main(["run", str(tmp / "job.yaml"), "--no-progress", "--redo-changed"]) == 0
  assert "3 images" in capsys.readouterr().out
  got = _rows(out)
  assert sorted(k for s, k in got if s == "p0.parquet") == ["a", "b", "c"]
  rep = inspection.summarize(str(out) + "/", input_uri=str(tmp / "in" / "*.parquet"), input_format="parquet")
  assert rep["exactly_once"]["changed_shards"] == [] and rep["exactly_once"]["duplicate_keys"] == []


def test_second_run_on_a_held_output_is_refused(setup, capsys):
  out = setup["out"]
  before = {p.name: _digest(p) for p in out.glob("*.parquet")}
  pq.write_table(pa.table({"key": ["z"], "img": ["img/a.jpg"]}), str(setup["tmp"] / "in" / "p2.parquet"))
  fs, root = sink.Sink(str(out) + "/", None).fs, str(out)   # new work above that the refused run must not do
  with lease.hold(fs, root, "other-run", "rerun"):       # another live run holds the output
    assert cli.main(["run", str(setup["tmp"] / "job.yaml"), "--no-progress"]) == 2
  err = capsys.readouterr().err
  assert "in use by run other-run" in err and "--force" in err
  assert {p.name: _digest(p) for p in out.glob("*.parquet")} == before    # nothing annotated, nothing written
  (setup["tmp"] / "in" / "p2.parquet").unlink()
