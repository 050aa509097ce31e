"""End to end on a local Ray: WebDataset shards in a loopback GCS emulator → typed Parquet in the emulator,
read back and checked row by row against the input keys. Plus the driver pieces that need no Ray."""
import hashlib
import io
import json

import pyarrow as pa
import pytest
from PIL import Image

from pgbatch import cli, config, demo, pipeline, schema, tasks
from pgbatch import annotate
from pgbatch.pipeline import commit as pipeline_commit
from pgbatch.pipeline import plan as pipeline_plan
from pgbatch.pipeline import progress as pipeline_progress
from pgbatch import placement
from tests import pipeline_helpers as H

TASKS = [
    {"name": "caption_en", "kind": "caption", "lang": "en", "max_new_tokens": 8},
    {"name": "objects", "kind": "detect", "classes": ["person", "cat"], "max_new_tokens": 8},
    {"name": "text", "kind": "ocr", "max_new_tokens": 8},
]


@pytest.fixture(scope="module")
def ray_session(gcs):
  """One local Ray for the module, started after the emulator so its workers see STORAGE_EMULATOR_HOST."""
  with H.local_ray() as ray:
    yield ray


@pytest.fixture(scope="module")
def e2e(gcs, ray_session, tmp_path_factory):
  """Runs the job once (shards and output in the emulator, model on local disk); yields what the tests read."""
  fs, bucket = gcs
  tmp = tmp_path_factory.mktemp("e2e")
  ckpt, tok = H.tiny_model(tmp / "model")
  photos = demo.samples()
  rows = [s for s in photos if s[0] != demo.BROKEN_KEY][:7] + [s for s in photos if s[0] == demo.BROKEN_KEY]
  local = demo.write_shards(tmp / "shards", rows, shards=2, prefix="photos")
  for p in local:
    fs.put(p, f"{bucket}/e2e/shards/{p.rsplit('/', 1)[-1]}")
  inputs = {}  # shard uri -> {key: (bytes, ext)}
  for i, row in enumerate(rows):
    uri = f"gs://{bucket}/e2e/shards/photos-{i * 2 // len(rows):05d}.tar"
    inputs.setdefault(uri, {})[row[0]] = (row[1], row[2], row[3])
  spec = config.from_dict(H.job("e2e", f"gs://{bucket}/e2e/shards/*.tar", f"gs://{bucket}/e2e/out/", ckpt, tok,
                                tasks=TASKS), environ={})
  summary = pipeline.run(spec, progress=False)
  rerun = pipeline.run(spec, progress=False)   # everything committed: nothing to do, no Ray work
  entries, tables = H.read_output(spec.output.uri, fs)
  yield dict(fs=fs, bucket=bucket, spec=spec, summary=summary, rerun=rerun, entries=entries, tables=tables,
             inputs=inputs)


def test_every_input_key_exactly_once_per_shard(e2e):
  assert e2e["summary"].success, e2e["summary"].failure
  by_shard = {}
  for t in e2e["tables"].values():
    for key, shard in zip(t.column("key").to_pylist(), t.column("shard").to_pylist()):
      by_shard.setdefault(shard, []).append(key)
  assert set(by_shard) == set(e2e["inputs"])
  for shard, keys in by_shard.items():
    assert sorted(keys) == sorted(e2e["inputs"][shard]), shard
    assert len(keys) == len(set(keys))
  n = sum(len(v) for v in e2e["inputs"].values())
  s = e2e["summary"]
  assert (s.images, s.ok, s.error, s.filtered) == (n, n - 1, 1, 0)
  assert list(s.reasons) == ["decode/TruncatedImageError"]
  assert s.shards_total == s.shards_committed == 2 and not s.shards_failed
  assert [e["name"] for e in e2e["entries"]] == sorted(e2e["tables"])


def test_output_files_are_typed_and_rows_match_their_images(e2e):
  spec = e2e["spec"]
  want = spec.output_schema()
  for name, t in e2e["tables"].items():
    assert t.schema.names == want.names
    for f in want:
      assert t.schema.field(f.name).type == f.type, f.name
    assert (t.schema.metadata or {}).get(schema.META_VERSION) == schema.SCHEMA_VERSION.encode()
    assert t.column("key").to_pylist() == sorted(t.column("key").to_pylist()), "rows sorted by key"
    for row in t.to_pylist():
      data, ext, sidecar = e2e["inputs"][row["shard"]][row["key"]]
      assert row["source_uri"] == f"{row['shard']}#{row['key']}.{ext}"
      assert json.loads(row["metadata"])["json"] == sidecar, "the .json sidecar passes through to the output"
      assert row["sha256"] == hashlib.sha256(data).hexdigest()
      prov = row["provenance"]
      assert prov["model_variant"] == "tiny-pg2" and prov["checkpoint_uri"] == spec.model.checkpoint
      assert len(prov["checkpoint_digest"]) == 64 and len(prov["tokenizer_digest"]) == 64
      assert prov["job_id"].startswith("e2e/") and prov["started_at"] is not None
      assert {f["name"] for f in prov["safety_filters"]} == {"toxicity", "wordlist", "pii", "nsfw"}
      assert row["safety"] is not None and row["safety"]["policy_digest"] == spec.safety.digest()
      if row["key"] == demo.BROKEN_KEY:
        assert row["status"] == "error" and row["error"]["stage"] == "decode", row["error"]
        assert row["error"]["type"] and row["error"]["message"]
        assert row["caption_en"] is None and row["objects"] is None and row["text"] is None
        continue
      assert row["status"] == "ok" and row["error"] is None, row["error"]
      w, h = Image.open(io.BytesIO(data)).size
      assert (row["width"], row["height"]) == (w, h)
      cap = row["caption_en"]
      assert cap["prompt"] == "caption en" and 1 <= cap["num_tokens"] <= 8 and isinstance(cap["text"], str)
      assert cap["truncated"] or cap["num_tokens"] < 8   # 8 tokens without EOS is a truncation
      assert row["objects"]["prompt"] == "detect person ; cat" and isinstance(row["objects"]["objects"], list)
      assert row["text"]["prompt"] == "ocr"


def test_manifest_entries_count_what_the_files_hold(e2e):
  for e in e2e["entries"]:
    t = e2e["tables"][e["name"]]
    st = t.column("status").to_pylist()
    assert (e["rows"], e["ok"], e["error"], e["filtered"]) == (t.num_rows, st.count("ok"), st.count("error"),
                                                               st.count("filtered"))
    assert e["job"] == "e2e" and e["run_id"] == e2e["summary"].run_id and e["seconds"] >= 0
    assert e["file"] == f"gs://{e2e['bucket']}/e2e/out/{e['name']}"
  assert e2e["fs"].ls(f"{e2e['bucket']}/e2e/out/_manifest")


def test_rerun_skips_committed_shards(e2e):
  r = e2e["rerun"]
  assert r.success and r.images == 0 and r.shards_skipped == 2 and r.shards_committed == 0


def test_inspect_reports_the_output(e2e, capsys):
  assert cli.main(["inspect", e2e["spec"].output.uri]) == 0
  out = capsys.readouterr().out
  assert "status:  ok 7  error 1  filtered 0" in out and "decode/" in out
  assert "caption_en (caption), objects (detect), text (ocr)" in out


def test_run_with_no_matching_shards_fails_clearly(tmp_path, capsys):
  spec = H.job("nothing", str(tmp_path / "none" / "*.tar"), str(tmp_path / "out"), "/m.npz", "/t.model")
  (tmp_path / "job.yaml").write_text(json.dumps(spec))
  assert cli.main(["run", str(tmp_path / "job.yaml"), "--no-progress"]) == 2
  err = capsys.readouterr().err
  assert "no input" in err and str(tmp_path / "none") in err
  assert not (tmp_path / "out").exists()


def test_unreadable_hash_list_fails_before_any_work(e2e, tmp_path, capsys):
  # An enabled hash list that cannot be read would make every row an error row: the run refuses to start.
  spec = H.job("hashes", str(tmp_path / "shards" / "*.tar"), str(tmp_path / "out"), e2e["spec"].model.checkpoint,
               e2e["spec"].model.tokenizer, safety={"hashlist": {"enabled": True, "uri": str(tmp_path / "nope.txt")}})
  demo.write_shards(tmp_path / "shards", demo.samples()[:1], shards=1)
  (tmp_path / "job.yaml").write_text(json.dumps(spec))
  assert cli.main(["run", str(tmp_path / "job.yaml"), "--no-progress"]) == 2
  err = capsys.readouterr().err
  assert "safety.hashlist.uri" in err and "nope.txt" in err
  assert not any((tmp_path / "out").glob("*.parquet"))


def test_progress_line_shows_rate_and_eta():
  class Tty(io.StringIO):
    def isatty(self):
      return True
  out = Tty()
  p = pipeline_progress.Progress(shards=4, stream=out, tick_s=0)
  assert "0/4 shards  0 images  checking input and model … 0:00" in p.text()
  p.phase("starting Ray")
  p.phase("loading and compiling the model")
  assert "loading and compiling the model … 0:00 (checking input and model 0:00, starting Ray 0:00)" in p.text()
  p.update(images=10, shard_rows={"a": 10})
  assert "10 images  … img/s annotating  ETA 0:" in p.text()  # ETA from the first batch: 4 shards of ~10
  p.first_at -= 2.0  # the second batch comes two seconds after the first
  p.update(images=10, shard_rows={"b": 10})
  assert p.rate() is not None and 4.0 <= p.rate() <= 5.0 and p.expected_images() == 40
  p.update(shards=1, done_images=10)
  p.close()
  text = out.getvalue()
  assert "1/4 shards  20 images" in text and "img/s annotating" in text and "ETA 0:" in text
  assert list(p.phases) == ["checking input and model", "starting Ray", "loading and compiling the model",
                            "annotating"] == list(pipeline_progress.PHASES)
  log = io.StringIO()  # not a terminal, and a run shorter than `every_s`: a line per phase, then the final line
  g = pipeline_progress.Progress(shards=2, stream=log, every_s=3600, tick_s=0)
  g.phase("starting Ray")
  g.phase("loading and compiling the model")
  g.update(images=4, shard_rows={"a": 2, "b": 2})
  g.update(shards=2, done_images=4)
  g.close()
  lines = log.getvalue().splitlines()
  assert [line.split("  ")[1] for line in lines] == ["0 images", "0 images", "4 images", "4 images"]
  assert "starting Ray … " in lines[0] and "loading and compiling" in lines[1] and "ETA 0:00" in lines[-1]
  assert lines[-1].startswith("[" + "#" * 24 + "] 2/2 shards") and "\r" not in log.getvalue()
  quiet = io.StringIO()
  q = pipeline_progress.Progress(shards=4, stream=quiet, enabled=False)
  q.update(images=3, shards=1, done_images=3)
  q.close()
  assert quiet.getvalue() == ""


def test_summary_line():
  s = pipeline.Summary(job="j", run_id="r", output_uri="gs://b/o/", shards_total=3, shards_skipped=1,
                       shards_committed=2, images=10, ok=8, error=1, filtered=1, seconds=5.0)
  assert s.success
  assert s.line() == ("pgbatch: j: 10 images (ok 8, error 1, filtered 1) in 2/3 shards, 1 already done, 5.0 s, "
                      "2.00 images/s wall-clock → gs://b/o/")
  s.annotate_rate, s.phases = 4.5, {"starting Ray": 3.2, "annotating": 2.0}
  assert "5.0 s, 4.50 images/s annotating, 2.00 images/s wall-clock → " in s.line()
  assert s.phases_line() == "phases: starting Ray 0:03, annotating 0:02"
  assert s.reasons_line() == ""
  s.reasons = {"read/ReadError": 1, "decode/TruncatedImageError": 3, "decode/EmptyImageError": 1}
  assert s.reasons_line() == "errors: decode/TruncatedImageError 3, decode/EmptyImageError 1, read/ReadError 1"
  assert s.reasons_line(top=1) == "errors: decode/TruncatedImageError 3, … (2 more)"
  s.shards_failed = ["x"]
  assert not s.success and "1 FAILED" in s.line()


@pytest.fixture(scope="module")
def parquet_job(ray_session, tmp_path_factory):
  """A Parquet input (Hugging Face style image struct, `id` keys, a `question` column) on local disk, with a
  per-image question task and a segment task (random VQ-VAE)."""
  import pyarrow.parquet as pq
  from pgbatch.model import vqvae
  tmp = tmp_path_factory.mktemp("pq")
  ckpt, tok = H.tiny_model(tmp / "model")
  vae = vqvae.write_random_vae(str(tmp / "model" / "vae.npz"))
  photos = [s for s in demo.samples() if s[0] != demo.BROKEN_KEY][:4]
  questions = ["what is this?", "how many cats?", None, "where is it?"]
  (tmp / "in").mkdir()
  pq.write_table(pa.table({
      "id": [f"img-{i}" for i in range(4)],
      "image": [{"bytes": b, "path": f"{k}.{e}"} for k, b, e, _ in photos],
      "question": questions}), str(tmp / "in" / "part-0.parquet"))
  tasks = [{"name": "vqa", "kind": "answer", "lang": "en", "question_field": "question", "max_new_tokens": 6},
           {"name": "masks", "kind": "segment", "classes": ["cat"], "max_new_tokens": 6}]
  spec = config.from_dict(H.job("pq", str(tmp / "in" / "*.parquet"), str(tmp / "out"), ckpt, tok, tasks=tasks,
                                fmt="parquet", fast_safety=True, input={"uri": str(tmp / "in" / "*.parquet"),
                                                                        "format": "parquet", "key_column": "id"},
                                model={"checkpoint": ckpt, "tokenizer": tok, "variant": H.VARIANT,
                                       "dtype": "float32", "vae": vae}), environ={})
  summary = pipeline.run(spec, progress=False)
  entries, tables = H.read_output(spec.output.uri)
  yield dict(summary=summary, rows=[r for t in tables.values() for r in t.to_pylist()], questions=questions,
             photos=photos, tables=tables, out=tmp / "out")


def test_parquet_input_with_per_image_questions(parquet_job):
  s = parquet_job["summary"]
  assert s.success and (s.images, s.ok, s.error) == (4, 3, 1), s
  rows = {r["key"]: r for r in parquet_job["rows"]}
  assert sorted(rows) == [f"img-{i}" for i in range(4)]
  for i, q in enumerate(parquet_job["questions"]):
    r = rows[f"img-{i}"]
    assert r["source_uri"].endswith(f"part-0.parquet#row{i}"), r["source_uri"]
    if q is None:  # no question for this image: an error row naming the missing field
      assert r["status"] == "error" and r["error"]["stage"] == "annotate" and "question" in r["error"]["message"]
      assert r["vqa"] is None and r["masks"] is None
    else:
      assert r["status"] == "ok", r["error"]
      assert r["vqa"]["prompt"] == f"answer en {q}" and r["masks"]["prompt"] == "segment cat"
      assert isinstance(r["masks"]["objects"], list)
  (t,) = parquet_job["tables"].values()
  assert t.schema.field("masks").type == schema.SEGMENT_TYPE and t.schema.field("vqa").type == schema.TEXT_TYPE


def test_question_fields_come_from_columns_or_the_json_sidecar():
  assert annotate.question_fields('{"json": {"question": "a?"}, "txt": "t"}')["question"] == "a?"
  assert annotate.question_fields('{"question": "col", "json": {"question": "side"}}')["question"] == "col"
  assert annotate.question_fields(None) == {} and annotate.question_fields("not json") == {}


def _part(shard: str, keys: list[str], expected: int) -> pa.Table:
  n = len(keys)
  return pa.table({"key": keys, "shard": [shard] * n, "status": ["ok"] * n,
                   pipeline_plan.SHARD_ROWS: pa.array([expected] * n, pa.int64()),
                   pipeline_plan.READ_AT: pa.array([1.0] * n, pa.float64())})


def test_shard_buffer_releases_a_shard_when_all_its_rows_arrived():
  buf = pipeline_commit.ShardBuffer()
  assert buf.add(pa.concat_tables([_part("a", ["a1", "a2"], 3), _part("b", ["b1"], 2)])) == []
  (done,) = buf.add(pa.concat_tables([_part("b", ["b2"], 2), _part("c", ["c1"], 4)]))
  assert done[0] == "b" and sorted(done[1].column("key").to_pylist()) == ["b1", "b2"]
  (done,) = buf.add(_part("a", ["a3"], 3))
  assert done[0] == "a" and done[1].num_rows == 3
  # more rows than were read, or rows after completion: never released, reported as broken
  assert buf.add(_part("c", ["c2", "c3", "c4", "c5"], 4)) == [] and "5 rows arrived for 4" in buf.broken["c"]
  assert buf.add(_part("c", ["c6"], 4)) == []
  assert buf.add(_part("a", ["a4"], 3)) == [] and "after the shard was complete" in buf.broken["a"]
  assert buf.complete == ["b", "a"]


def test_commit_retries_io_errors_but_not_data_errors():
  class FlakySink:
    def __init__(self, failures, exc):
      self.failures, self.exc, self.calls = failures, exc, 0

    def commit_shard(self, shard_id, table, stats):
      self.calls += 1
      if self.calls <= self.failures:
        raise self.exc
      return f"gs://b/{shard_id}.parquet"

  s = FlakySink(2, OSError("503 backend error"))
  assert pipeline_commit.commit_with_retry(s, "x", None, {}, backoff_s=0) == "gs://b/x.parquet" and s.calls == 3
  s = FlakySink(5, OSError("503"))
  with pytest.raises(OSError):
    pipeline_commit.commit_with_retry(s, "x", None, {}, attempts=3, backoff_s=0)
  assert s.calls == 3
  s = FlakySink(1, ValueError("column 'key' has nulls"))
  with pytest.raises(ValueError):
    pipeline_commit.commit_with_retry(s, "x", None, {}, backoff_s=0)
  assert s.calls == 1


def test_local_resources_checked_before_waiting_for_actors():
  spec = config.from_dict(H.job("r", "a", "b", "c", "d"), environ={})
  placement.check_local_resources(spec, {"CPU": 2.0})
  with pytest.raises(placement.ResourceError, match="needs 4.5, this machine has 2"):
    placement.check_local_resources(config.from_dict(H.job("r", "a", "b", "c", "d"), overrides=["resources.actors=4"],
                                                    environ={}), {"CPU": 2.0})
  gpu = config.from_dict(H.job("r", "a", "b", "c", "d"), overrides=["resources.accelerator=gpu"], environ={})
  with pytest.raises(placement.ResourceError, match="GPU: needs 1, this machine has 0"):
    placement.check_local_resources(gpu, {"CPU": 16.0})
  placement.check_local_resources(gpu, {"CPU": 16.0, "GPU": 1.0})


def test_corrupt_model_fails_before_ray_and_in_the_actors_with_exit_2(ray_session, tmp_path, capsys, monkeypatch):
  """A checkpoint whose headers read fine but whose data is corrupt (one flipped byte: zip CRC) fails the
  driver's preflight (every tensor read once): exit 2, one line naming the problem, nothing written. When it
  still fails only in the annotate actors (here: the preflight skipped), the run ends (does not hang) with the
  same exit 2 and message, never "rerun to resume" (a rerun would fail the same way)."""
  ckpt, tok = H.tiny_model(tmp_path / "model")
  data = bytearray(open(ckpt, "rb").read())
  data[len(data) // 2] ^= 0xFF
  bad = tmp_path / "model" / "corrupt.npz"
  bad.write_bytes(bytes(data))
  demo.write_shards(tmp_path / "shards", demo.samples()[:2], shards=1, prefix="f")
  spec = H.job("fails", str(tmp_path / "shards" / "*.tar"), str(tmp_path / "out") + "/", str(bad), tok,
               fast_safety=True)
  spec["resources"].update(init_retries=0, init_backoff_s=0, wait_for_actors_s=120)
  (tmp_path / "job.yaml").write_text(json.dumps(spec))
  assert cli.main(["run", str(tmp_path / "job.yaml"), "--no-progress"]) == 2
  captured = capsys.readouterr()
  (line,) = captured.err.strip().splitlines()
  assert line.startswith("pgbatch run: fails: cannot load the model: ") and "CRC mismatch" in line, captured.err
  from pgbatch.pipeline import driver
  monkeypatch.setattr(driver, "verify_model", lambda spec: None)
  assert cli.main(["run", str(tmp_path / "job.yaml"), "--no-progress"]) == 2
  captured = capsys.readouterr()
  assert "in 0/1 shards" in captured.out, captured.out
  last = captured.err.strip().splitlines()[-1]
  assert last.startswith("pgbatch run: fails: cannot load the model: ") and "CRC mismatch" in last, captured.err
  assert "rerun" not in captured.err
  assert not list((tmp_path / "out").glob("*.parquet")) and not list((tmp_path / "out").glob("_manifest/*"))


def test_inspect_warns_about_files_without_a_manifest_entry(parquet_job, capsys):
  from pgbatch import inspection as inspect
  stray = parquet_job["out"] / "left-over-0123456789ab.parquet"
  stray.write_bytes(b"PAR1 from a killed run")
  try:
    rep = inspect.summarize(str(parquet_job["out"]))
    assert rep["rows"] == 4 and rep["status"] == {"ok": 3, "error": 1, "filtered": 0}
    assert rep["error_reasons"] == {"annotate/PromptError": 1}
    assert rep["uncommitted_files"] == [str(stray)]
    assert cli.main(["inspect", str(parquet_job["out"]), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["uncommitted_files"] == [str(stray)]
    assert "WARNING: 1 file(s) without a valid manifest entry" in inspect.format_report(rep)
  finally:
    stray.unlink()


def test_two_batches_in_flight_per_actor_give_the_same_output(e2e, ray_session, tmp_path):
  # resources.concurrent_batches=2 (the gpu/tpu default): the Annotator runs two batches on two threads.
  fs, bucket = e2e["fs"], e2e["bucket"]
  spec = config.from_dict(H.job("threads", f"gs://{bucket}/e2e/shards/*.tar", str(tmp_path / "out") + "/",
                                e2e["spec"].model.checkpoint, e2e["spec"].model.tokenizer, tasks=TASKS,
                                fast_safety=True, batch_size=2), environ={})
  spec = spec.model_copy(update={"resources": spec.resources.model_copy(update={"concurrent_batches": 2})})
  summary = pipeline.run(spec, progress=False)
  assert summary.success and summary.images == sum(len(v) for v in e2e["inputs"].values()), summary
  _, tables = H.read_output(spec.output.uri)
  got = {r["key"]: r for t in tables.values() for r in t.to_pylist()}
  want = {r["key"]: r for t in e2e["tables"].values() for r in t.to_pylist()}
  assert sorted(got) == sorted(want)
  for key, r in got.items():
    assert r["status"] == want[key]["status"]
    for name in ("caption_en", "objects", "text"):
      assert (r[name] or {}).get("num_tokens") == (want[key][name] or {}).get("num_tokens"), (key, name)
