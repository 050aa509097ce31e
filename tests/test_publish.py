"""`pgbatch publish OUTPUT --iceberg CATALOG.TABLE`: a real run's committed files, as an Iceberg table in a SQLite
SQL catalog, published again and again; a pyiceberg scan reads exactly the committed rows each time."""
from __future__ import annotations

import shutil

import pyarrow.parquet as pq
import pytest

from pgbatch import config, pipeline, publish
from pgbatch import schema as schema_lib
from pgbatch import tasks as tasks_lib
from pgbatch.io import sink
from tests import bad_images
from tests import pipeline_helpers as H

TASKS = [
    {"name": "caption_en", "kind": "caption", "lang": "en", "max_new_tokens": 8},
    {"name": "objects", "kind": "detect", "classes": ["person", "cat"], "max_new_tokens": 8},
]
TABLE = "lake.annotations.nightly"


def catalog_props(tmp) -> dict:
  return {"type": "sql", "uri": f"sqlite:///{tmp}/catalog.db", "warehouse": f"file://{tmp}/warehouse"}


def committed_rows(output: str) -> list[dict]:
  rows = [r for e in sink.read_manifest(output) for r in pq.read_table(e["file"]).to_pylist()]
  return sorted(rows, key=lambda r: (r["shard"], r["key"]))


def table_rows(props: dict) -> list[dict]:
  from pyiceberg.catalog import load_catalog
  table = load_catalog("lake", **props).load_table(("annotations", "nightly"))
  return sorted(table.scan().to_arrow().to_pylist(), key=lambda r: (r["shard"], r["key"]))


@pytest.fixture(scope="module")
def nightly(tmp_path_factory):
  """Two nights of one job: night 1 on one shard, night 2 after a second shard arrived (resume skips the first)."""
  tmp = tmp_path_factory.mktemp("publish")
  ckpt, tok = H.tiny_model(tmp / "model")
  samples = bad_images.bad_samples()
  (tmp / "in").mkdir()
  bad_images.write_webdataset(str(tmp / "in" / "a-00000.tar"), samples[:7])
  out = str(tmp / "out")
  spec = config.from_dict(H.job("publish", f"{tmp}/in/*.tar", out, ckpt, tok, tasks=TASKS, fast_safety=True),
                          environ={})
  with H.local_ray():
    night1 = pipeline.run(spec, progress=False)
    bad_images.write_webdataset(str(tmp / "in" / "a-00001.tar"), samples[7:])
    yield dict(tmp=tmp, out=out, spec=spec, night1=night1, night2=lambda: pipeline.run(spec, progress=False))


def test_publish_is_idempotent_and_reads_exactly_the_committed_rows(nightly):
  tmp, out = nightly["tmp"], nightly["out"]
  assert nightly["night1"].success, nightly["night1"].failure
  props = catalog_props(tmp)
  # A leftover of a killed run (data file, no marker) is never published.
  (name,) = [e["name"] for e in sink.read_manifest(out)]
  shutil.copy(f"{out}/{name}", f"{out}/killed-0123456789ab.parquet")

  first = publish.publish(out, TABLE, props)
  assert (first["added"], first["removed"], first["unchanged"], first["rows_added"]) == (1, 0, 0, 7)
  rows = table_rows(props)
  assert rows == committed_rows(out) and len(rows) == 7
  assert {r["status"] for r in rows} == {"ok", "error"}   # error rows (struct error column) travel too

  again = publish.publish(out, TABLE, props)                  # nothing new: no new snapshot
  assert (again["added"], again["removed"], again["unchanged"]) == (0, 0, 1)
  assert again["snapshot_id"] == first["snapshot_id"] and table_rows(props) == rows

  # Night 2: a new shard committed; only it is added.
  assert nightly["night2"]().success
  second = publish.publish(out, TABLE, props)
  assert (second["added"], second["removed"], second["unchanged"]) == (1, 0, 1)
  rows = table_rows(props)
  assert rows == committed_rows(out) and len(rows) == len(bad_images.bad_samples())

  # A committed shard rewritten in place (same name, other bytes) replaces its entry: no row twice.
  entry = sink.read_manifest(out)[0]
  table = pq.read_table(entry["file"])
  sink.Sink(out, table.schema, compression="none").commit_shard(entry["shard"], table)
  assert sink.read_manifest(out)[0]["size"] != entry["size"]
  third = publish.publish(out, TABLE, props)
  assert (third["added"], third["removed"], third["unchanged"]) == (1, 1, 1)
  assert table_rows(props) == committed_rows(out)

  # The table's schema is the output contract of the job's tasks, field docs included.
  from pyiceberg.catalog import load_catalog
  iceberg = load_catalog("lake", **props).load_table(("annotations", "nightly"))
  files = [e["file"] for e in sink.read_manifest(nightly["out"])]
  contract = schema_lib.output_schema(tasks_lib.tasks_of(pq.read_schema(files[0])))
  assert [t.name for t in tasks_lib.tasks_of(pq.read_schema(files[0]))] == [t["name"] for t in TASKS]
  assert [f.name for f in iceberg.schema().fields] == contract.names
  assert iceberg.schema().find_field("key").required and iceberg.schema().find_field("key").doc
  assert iceberg.properties["pgbatch.schema"] == schema_lib.SCHEMA_NAME


def test_publish_cli(nightly, tmp_path):
  props = catalog_props(tmp_path)
  flags = [a for k, v in props.items() for a in ("--catalog-property", f"{k}={v}")]
  out = H.run_cli("publish", nightly["out"], "--iceberg", "lake.nightly", *flags)
  assert out.returncode == 0, out.stderr
  assert "default.nightly: " in out.stdout and "file(s) added" in out.stdout
  bad = H.run_cli("publish", nightly["out"], "--iceberg", "lake", *flags)
  assert bad.returncode == 2 and "CATALOG.TABLE" in bad.stderr and "Traceback" not in bad.stderr
  with pytest.raises(ValueError, match="no committed shards"):
    publish.publish(str(tmp_path / "nothing"), "lake.nightly", props)
