"""The output contract: Arrow types, schemas/ drift, JSON Schema, and Parquet files read by DuckDB and Polars.

A small annotation table for the canonical job (captions, OCR, per-image VQA, detections, segments with
real VQ-VAE masks, an error row and a filtered row) is written as two Parquet files; DuckDB, Polars,
pyarrow and pycocotools read them back, and every example query of the published Markdown is run on them.
"""
import datetime
import hashlib
import json
import os
import pathlib
import subprocess
import sys
from collections import Counter

import duckdb
import jsonschema
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pgbatch import masks as M
from pgbatch import schema as S
from pgbatch import schema_docs as D
from pgbatch import tasks as T
from pgbatch.model import vqvae

ROOT = pathlib.Path(__file__).resolve().parents[1]


def loc(*vs):
  return "".join(f"<loc{v:04d}>" for v in vs)


def seg(*vs):
  return "".join(f"<seg{v:03d}>" for v in vs)


def plain(t: pa.DataType) -> pa.DataType:
  """The type with every field nullable, no field metadata, plain string/list (how engines hand types back)."""
  if pa.types.is_struct(t):
    return pa.struct([pa.field(f.name, plain(f.type)) for f in t])
  if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_list_view(t):
    return pa.list_(plain(t.value_type))
  if pa.types.is_large_string(t) or pa.types.is_string_view(t):
    return pa.string()
  if pa.types.is_timestamp(t) and t.tz in ("Etc/UTC", "UTC"):
    return pa.timestamp(t.unit, tz="UTC")
  return t


def fields_of(t: pa.DataType, prefix=""):
  """(path, field) of every nested field."""
  while pa.types.is_list(t):
    t = t.value_type
  if pa.types.is_struct(t):
    for f in t:
      yield prefix + f.name, f
      yield from fields_of(f.type, prefix + f.name + ".")


# ---------------------------------------------------------------------------------------------------------
# Arrow types

BOX = [("label", pa.string())] + [(k, pa.float32()) for k in ("ymin", "xmin", "ymax", "xmax")] + \
      [(k + "_px", pa.int32()) for k in ("ymin", "xmin", "ymax", "xmax")]
COMMON = [("raw", pa.string()), ("prompt", pa.string()), ("num_tokens", pa.int32()), ("truncated", pa.bool_()),
          ("parse_errors", pa.list_(pa.struct([("part", pa.string()), ("reason", pa.string())])))]
EXPECTED = {
    "caption": pa.struct([("text", pa.string()), ("prompt", pa.string()), ("num_tokens", pa.int32()),
                          ("truncated", pa.bool_())]),
    "detect": pa.struct([("objects", pa.list_(pa.struct(BOX)))] + COMMON),
    "segment": pa.struct([("objects", pa.list_(pa.struct(BOX + [("mask", pa.struct([
        ("height", pa.int32()), ("width", pa.int32()), ("rle", pa.list_(pa.int32()))]))])))] + COMMON),
}
EXPECTED["ocr"] = EXPECTED["answer"] = EXPECTED["caption"]


@pytest.mark.parametrize("kind", T.KINDS)
def test_arrow_types_per_kind(kind):
  t = S.ARROW_TYPES[kind]
  assert plain(t) == EXPECTED[kind]
  for path, f in fields_of(t):
    assert (f.metadata or {}).get(b"doc"), f"{kind}: {path} has no doc"
  # optional parts are nullable, the rest is always present in an ok row
  nullable = {p for p, f in fields_of(t) if f.nullable}
  assert nullable == ({"prompt", "objects.mask"} if kind == "segment" else {"prompt"})


def test_output_schema_layout_and_metadata():
  tasks = D.canonical_tasks()
  sch = S.output_schema(tasks)
  assert sch.names == list(S.FIXED_NAMES) + ["caption_en", "ocr", "vqa", "detections", "segments"]
  assert S.FIXED_NAMES == ("key", "source_uri", "shard", "sha256", "width", "height", "metadata", "status", "error",
                           "provenance", "safety")
  assert sch.field("width").type == pa.int32() and sch.field("status").nullable is False
  assert sch.field("provenance").type.field("started_at").type == pa.timestamp("us", tz="UTC")
  for t in tasks:
    f = sch.field(t.name)
    assert f.type == t.arrow_type and f.nullable
    assert t.kind in f.metadata[b"doc"].decode()
  for f in sch:
    assert f.metadata[b"doc"], f.name
    for path, sub in fields_of(f.type):
      assert (sub.metadata or {}).get(b"doc"), f"{f.name}.{path}"
  assert sch.metadata[S.META_VERSION] == b"1"
  assert json.loads(sch.metadata[S.META_TASKS]) == [t.spec() for t in tasks]
  assert T.tasks_of(sch) == tasks
  other = S.output_schema([T.make_task({"name": "boxes", "kind": "detect", "classes": ["x"]})])
  assert other.names[-1] == "boxes" and other.field("boxes").type == S.DETECT_TYPE


@pytest.mark.parametrize("names,msg", [(["status"], "a fixed output column"), (["a", "a"], "another task"),
                                       (["key"], "a fixed output column")])
def test_output_schema_rejects_name_clashes(names, msg):
  with pytest.raises(ValueError, match=rf"tasks\[{names[-1]}\]\.name: clashes with {msg}"):
    S.output_schema([T.make_task({"name": n, "kind": "ocr"}) for n in names])


# ---------------------------------------------------------------------------------------------------------
# The published files

def test_schemas_dir_matches_the_code(tmp_path):
  """schemas/ must be exactly what `pgbatch schema export` writes; regenerate with that command on failure."""
  out = tmp_path / "schemas"
  proc = subprocess.run([sys.executable, "-m", "pgbatch.cli", "schema", "export", "--out", str(out)],
                        cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  written = sorted(p.name for p in out.iterdir())
  assert written == [f"{S.SCHEMA_NAME}.json", f"{S.SCHEMA_NAME}.md"]
  assert sorted(p.name for p in (ROOT / "schemas").iterdir()) == written
  for name in written:
    assert (ROOT / "schemas" / name).read_text() == (out / name).read_text(), \
        f"schemas/{name} is stale: run `pgbatch schema export`"
  assert json.loads((ROOT / "schemas" / f"{S.SCHEMA_NAME}.json").read_text()) == D.json_schema()


def test_markdown_documents_every_column():
  md = (ROOT / "schemas" / f"{S.SCHEMA_NAME}.md").read_text()
  sch = S.output_schema(D.canonical_tasks())
  for f in sch:
    assert f"| `{f.name}` |" in md
    for path, sub in fields_of(f.type):
      full = f.name + "." + path
      # list levels are written as `[]` in the Markdown paths
      rows = [line for line in md.splitlines() if line.startswith("| `") and
              line.split("`")[1].replace("[]", "") == full]
      assert len(rows) == 1, full
      assert sub.metadata[b"doc"].decode().replace("|", "\\|") in rows[0]
  assert "v / 1024" in md and "column-major" in md and "frPyObjects" in md


def test_schema_show_cli(tmp_path):
  job = tmp_path / "job.yaml"
  job.write_text("tasks:\n  - {name: boxes, kind: detect, classes: [car]}\n  - {name: cap, kind: caption}\n")
  args = [sys.executable, "-m", "pgbatch.cli", "schema", "show", "--job", str(job)]
  tree = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120, check=True).stdout
  assert "boxes: struct  # detect task 'boxes'" in tree
  assert "    xmin: float32 not null  # left edge" in tree
  js = json.loads(subprocess.run(args + ["--format", "json"], cwd=ROOT, capture_output=True, text=True,
                                 timeout=120, check=True).stdout)
  assert js["x-pgbatch"]["tasks"][0] == {"name": "boxes", "kind": "detect", "classes": ["car"],
                                         "max_new_tokens": 48}
  assert js["properties"]["cap"]["anyOf"][0] == {"$ref": "#/$defs/text_result"}


# ---------------------------------------------------------------------------------------------------------
# A written job output

STARTED = datetime.datetime(2026, 12, 1, 3, 0, tzinfo=datetime.timezone.utc)


def _fixed(key, shard, status, w=640, h=480, error=None, decision="pass"):
  return {
      "key": key, "source_uri": f"{shard}#{key}.jpg", "shard": shard, "sha256": hashlib.sha256(key.encode()).hexdigest(),
      "width": w, "height": h, "metadata": json.dumps({"key": key}), "status": status, "error": error,
      "provenance": {"model_variant": "pg2-3b-224", "checkpoint_uri": "gs://ckpt/pg2.npz",
                     "checkpoint_digest": "sha256:00", "tokenizer_digest": "11", "pgbatch_version": "0.1.0",
                     "job_id": "nightly-20261201", "started_at": STARTED,
                     "safety_filters": [{"name": "text", "version": "1.0", "model_sha256": None}]},
      "safety": {"decision": decision, "findings": [], "scores": [
          {"filter": "text", "category": "toxicity", "field": "caption_en.text", "score": 0.25}],
          "policy_digest": "22"},
  }


@pytest.fixture(scope="module")
def job(tmp_path_factory):
  """(tasks by name, rows per file, output dir) for the canonical job."""
  vae = vqvae.make_decoder(vqvae.params_from_npz(vqvae.random_npz_arrays(seed=5, emb_dim=8)))
  tasks = {t.name: t for t in D.canonical_tasks()}
  tasks["segments"] = tasks["segments"].bind(vae)
  outputs = [  # (key, w, h, caption, ocr, question, answer, detect text, segment text)
      ("a", 640, 480, "a red car parked next to a dog", "STOP", "what color is the car?", "red",
       loc(100, 200, 300, 400) + " car ; " + loc(500, 0, 1023, 300) + " dog ; " + loc(1, 2, 3, 4) + " car",
       loc(0, 0, 1023, 1023) + seg(*range(16)) + " cat"),
      ("b", 300, 200, "two people", "", "how many people?", "2",
       loc(0, 0, 512, 512) + " person ; " + loc(10, 10, 20, 20) + " unicorn ; " + loc(9, 9, 8, 8) + " car",
       loc(100, 100, 900, 900) + seg(*[7] * 16) + " dog ; " + loc(5, 5, 50, 50) + seg(1, 2) + " dog"),
      ("c", 1024, 768, "an empty street", "EXIT 12", "is it raining?", "no", "", "garbage text"),
  ]
  rows = []
  for key, w, h, cap, ocr, q, ans, det, sg in outputs:
    row = _fixed(key, "gs://in/shard-0.tar", "ok", w, h)
    row["caption_en"] = tasks["caption_en"].parse(cap, len(cap.split()) + 1, False, w, h)
    row["ocr"] = tasks["ocr"].parse(ocr, 3, False, w, h)
    row["vqa"] = tasks["vqa"].parse(ans, 2, False, w, h, prompt=tasks["vqa"].prompt({"question": q}))
    row["detections"] = tasks["detections"].parse(det, 30, False, w, h)
    row["segments"] = tasks["segments"].parse(sg, 45, key == "b", w, h)
    rows.append(row)
  bad = _fixed("d", "gs://in/shard-1.tar", "error", None, None,
               {"stage": "decode", "type": "UnidentifiedImageError", "message": "cannot identify image file"})
  bad["provenance"]["safety_filters"] = []
  bad["safety"] = None
  hidden = _fixed("e", "gs://in/shard-1.tar", "filtered", decision="filtered")
  ok = _fixed("f", "gs://in/shard-1.tar", "ok", 64, 64)
  for name, text in (("caption_en", "a cat"), ("ocr", "HELLO"), ("vqa", "yes"),
                     ("detections", loc(0, 0, 1023, 1023) + " dog"), ("segments", "")):
    prompt = "answer en is it a cat?" if name == "vqa" else None
    ok[name] = tasks[name].parse(text, 4, False, 64, 64, prompt=prompt)
  for r in (bad, hidden):
    r.update({name: None for name in tasks})
  files = {"part-0.parquet": rows, "part-1.parquet": [bad, hidden, ok]}
  out = tmp_path_factory.mktemp("out")
  sch = S.output_schema(list(tasks.values()))
  for name, file_rows in files.items():
    pq.write_table(pa.Table.from_pylist(file_rows, schema=sch), str(out / name))
  return tasks, files, str(out)


def _all_rows(job):
  return [r for rows in job[1].values() for r in rows]


def test_parquet_keeps_types_docs_and_task_list(job):
  tasks, files, out = job
  sch = S.output_schema(list(tasks.values()))
  for name, rows in files.items():
    back = pq.read_table(os.path.join(out, name))
    assert back.schema.equals(sch, check_metadata=True)
    assert back.schema.field("detections").type.field("objects").type.value_type.field("ymin").metadata[b"doc"]
    assert T.tasks_of(back.schema) == list(tasks.values())
    assert back.to_pylist() == rows


def test_rows_match_the_json_schema(job):
  validator = jsonschema.Draft202012Validator(D.json_schema())
  jsonschema.Draft202012Validator.check_schema(D.json_schema())
  as_json = lambda r: json.loads(json.dumps(r, default=lambda d: d.isoformat()))
  rows = [as_json(r) for r in _all_rows(job)]
  for r in rows:
    validator.validate(r)
  # another job's column names validate through the result types
  renamed = dict(rows[0])
  renamed["boxes"] = renamed.pop("detections")
  validator.validate(renamed)
  # and a wrong value is caught
  broken = json.loads(json.dumps(rows[0]))
  broken["detections"]["objects"][0]["ymin"] = "0.1"
  assert not validator.is_valid(broken)
  broken = json.loads(json.dumps(rows[0]))
  broken["segments"]["objects"][0]["mask"]["rle"] = [1.5]
  assert not validator.is_valid(broken)
  broken = dict(rows[0])
  del broken["status"]
  assert not validator.is_valid(broken)
  broken = dict(rows[0], boxes={"objects": "nope"})
  assert not validator.is_valid(broken)


def test_duckdb_reads_every_nested_type(job):
  tasks, _, out = job
  con = duckdb.connect()
  con.execute("SET TimeZone = 'UTC'")
  rel = con.sql(f"SELECT * FROM read_parquet('{out}/*.parquet') ORDER BY key")
  got = rel.to_arrow_table()
  want = S.output_schema(list(tasks.values()))
  assert [plain(f.type) for f in got.schema] == [plain(f.type) for f in want]
  assert got.num_rows == 6
  types = dict(con.sql(f"SELECT column_name, column_type FROM (DESCRIBE SELECT * FROM read_parquet('{out}/*.parquet'))")
               .fetchall())
  assert types["width"] == "INTEGER"
  assert "ymin FLOAT" in types["detections"] and "ymin_px INTEGER" in types["detections"]
  assert "rle INTEGER[]" in types["segments"] and "parse_errors STRUCT(part VARCHAR, reason VARCHAR)[]" in \
      types["detections"]
  assert "started_at TIMESTAMP WITH TIME ZONE" in types["provenance"]
  # python values come back intact, the timestamp as an aware datetime
  started, xmax, rle = con.sql(
      f"SELECT provenance.started_at, detections.objects[1].xmax, segments.objects[1].mask.rle "
      f"FROM read_parquet('{out}/*.parquet') WHERE key = 'a'").fetchall()[0]
  assert started == STARTED and started.utcoffset() == datetime.timedelta(0)
  assert xmax == 400 / 1024 and isinstance(rle, list) and sum(rle) == 640 * 480


def test_polars_reads_every_nested_type(job):
  tasks, _, out = job
  df = pl.read_parquet(f"{out}/*.parquet")
  want = pl.from_arrow(pa.Table.from_pylist([], schema=S.output_schema(list(tasks.values())))).schema
  assert df.schema == want
  fields = lambda dtype: {f.name: f.dtype for f in dtype.fields}
  box = fields(fields(df.schema["detections"])["objects"].inner)
  assert box["ymin"] == pl.Float32 and box["ymax_px"] == pl.Int32 and box["label"] == pl.String
  mask = fields(fields(df.schema["segments"])["objects"].inner)["mask"]
  assert fields(mask) == {"height": pl.Int32, "width": pl.Int32, "rle": pl.List(pl.Int32)}
  assert fields(df.schema["provenance"])["started_at"] == pl.Datetime("us", "UTC")
  assert fields(df.schema["caption_en"])["truncated"] == pl.Boolean
  assert df.height == 6 and df["status"].to_list().count("ok") == 4


def test_masks_decode_with_pycocotools_after_the_round_trip(job):
  from pycocotools import mask as mask_utils
  _, _, out = job
  n = 0
  for row in pq.read_table(os.path.join(out, "part-0.parquet"), columns=["key", "width", "height", "segments"]) \
      .to_pylist():
    for obj in row["segments"]["objects"]:
      if obj["mask"] is None:
        continue
      m = obj["mask"]
      assert (m["height"], m["width"]) == (row["height"], row["width"])
      rle = mask_utils.frPyObjects({"size": [m["height"], m["width"]], "counts": m["rle"]}, m["height"], m["width"])
      decoded = mask_utils.decode(rle).astype(bool)
      np.testing.assert_array_equal(decoded, M.rle_decode(m["rle"], m["height"], m["width"]))
      assert decoded[:obj["ymin_px"]].sum() == 0 and decoded[obj["ymax_px"]:].sum() == 0
      n += 1
  assert n == 2


# ---------------------------------------------------------------------------------------------------------
# The published example queries, run on the written output

def _expected(job):
  ok = [r for r in _all_rows(job) if r["status"] == "ok"]
  labels = Counter(o["label"] for r in ok for o in r["detections"]["objects"])
  chars = [len(r["caption_en"]["text"]) for r in ok]
  return ok, labels, sum(chars) / len(chars)


def test_example_queries_return_the_expected_values(job):
  _, _, out = job
  ok, labels, mean_chars = _expected(job)
  assert labels == {"car": 2, "dog": 2, "person": 1}  # the corpus above: repeated, unknown and inverted boxes
  glob = f"{out}/*.parquet"
  results = {}
  for title, lang, code in D.EXAMPLE_QUERIES:
    assert "out/*.parquet" in code, title
    code = code.replace("out/*.parquet", glob)
    if lang == "sql":
      results[title] = duckdb.connect().sql(code).fetchall()
    else:
      scope = {}
      exec(compile(code, title, "exec"), scope)  # noqa: S102 - the published snippet itself
      results[title] = scope["result"]
  by = lambda prefix: next(v for k, v in results.items() if k.startswith(prefix))
  assert by("Detections per label (DuckDB)") == [("car", 2), ("dog", 2), ("person", 1)]
  mean, tokens = by("Mean caption length in characters (DuckDB)")[0]
  assert mean == pytest.approx(mean_chars)
  assert tokens == pytest.approx(np.mean([r["caption_en"]["num_tokens"] for r in ok]))
  assert by("Rows by status and error stage (DuckDB)") == [
      ("ok", None, None, 4), ("error", "decode", "UnidentifiedImageError", 1), ("filtered", None, None, 1)]
  errors = by("Outputs the parser could not fully read (DuckDB)")
  assert errors == [("b", loc(9, 9, 8, 8) + " car", "empty or inverted box (needs ymax > ymin and xmax > xmin)"),
                    ("b", loc(10, 10, 20, 20) + " unicorn", "label 'unicorn' is not one of the task's classes")]
  assert by("Detections per label (Polars)").rows() == [("car", 2), ("dog", 2), ("person", 1)]
  assert by("Mean caption length (Polars)").item() == pytest.approx(mean_chars)
  coco = by("Segment masks as COCO RLE (pycocotools)")
  areas = {k: [(label, int(M.rle_decode(o["mask"]["rle"], o["mask"]["height"], o["mask"]["width"]).sum()))
               for r in ok if r["key"] == k for o in r["segments"]["objects"] if o["mask"] is not None
               for label in [o["label"]]] for k in ("a", "b")}
  assert coco == areas and all(a > 0 for v in areas.values() for _, a in v)


def test_readme_output_contract_snippets_run(job):
  """The README's "Output contract" section: its type table matches the code and its snippets run."""
  import re
  _, _, out = job
  readme = (ROOT / "README.md").read_text()
  section = readme.split("\n## Output contract\n", 1)[1].split("\n## ", 1)[0]
  for kind in ("detect", "segment"):
    for path, f in fields_of(S.ARROW_TYPES[kind]):
      assert path.split(".")[-1] in section, (kind, path)
  blocks = re.findall(r"```(sql|python)\n(.*?)```", section, re.S)
  assert [lang for lang, _ in blocks] == ["sql", "python", "python"]
  ok, labels, _ = _expected(job)
  rows = duckdb.connect().sql(blocks[0][1].replace("out/*.parquet", f"{out}/*.parquet")).fetchall()
  assert Counter(r[1] for r in rows) == labels
  assert ("a", "car", 125, 47, 250, 141) in rows   # loc 100,200,300,400 on 640x480
  scope = {}
  exec(blocks[1][1].replace("out/*.parquet", f"{out}/*.parquet"), scope)  # noqa: S102
  assert scope["boxes"].height == sum(labels.values())
  assert scope["boxes"].schema["ymin"] == pl.Float32
  scope = {}
  exec(blocks[2][1].replace("out/*.parquet", f"{out}/*.parquet"), scope)  # noqa: S102
  assert scope["binary"].shape == (200, 300)   # the last mask: row b, 300x200


def test_cli_output_piped_into_a_closed_reader_is_quiet():
  # `pgbatch schema show | head -1`: the reader closes the pipe early; no BrokenPipe traceback, exit 0.
  proc = subprocess.Popen([sys.executable, "-m", "pgbatch.cli", "schema", "show"], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE)
  assert proc.stdout.readline().startswith(b"key: string")
  proc.stdout.close()
  err = proc.stderr.read()
  assert proc.wait(timeout=60) == 0 and b"Traceback" not in err, err
