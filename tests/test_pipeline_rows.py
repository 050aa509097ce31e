"""The row contract end to end: one shard holding one input of every kind through the real pipeline (real Ray,
real decoder, real safety filters, real model), committed, read back with DuckDB and validated against the
published schema (schemas/annotations.v1.json): every input exactly once, with the right status and reason."""
import hashlib
import io
import json
import tarfile
from pathlib import Path

import duckdb
import jsonschema
import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from pgbatch import config, demo, pipeline, rows, schema, schema_docs
from pgbatch.io import sink
from pgbatch.safety.policy import SafetyPolicy
from pgbatch.safety.registry import load_filter
from pgbatch.safety.stages import PostFilter
from tests import pipeline_helpers as H

SCHEMA_FILE = H.ROOT / "schemas" / f"{schema.SCHEMA_NAME}.json"
TASKS = [{"name": "caption_en", "kind": "caption", "lang": "en", "max_new_tokens": 4},
         {"name": "objects", "kind": "detect", "classes": ["cat"], "max_new_tokens": 4}]


def _noise_jpeg(seed: int) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(np.random.default_rng(seed).integers(0, 256, (96, 96, 3), np.uint8)).save(buf, "JPEG")
  return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data) -> None:
  """data: bytes, or (tar member type, link name) for a member without content."""
  info = tarfile.TarInfo(name)
  info.mode = 0o644
  if isinstance(data, tuple):
    info.type, info.linkname = data
    tar.addfile(info)
    return
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def _inputs() -> tuple[list[tuple[str, bytes]], dict, float, str]:
  """(tar members in order, key -> (status, error stage/type or filter), nsfw threshold, the listed hash): the
  nsfw victim is the candidate the real open_nsfw model scores highest; the threshold lies between it and the
  rest."""
  photos = [(k, b, e) for k, b, e, _ in demo.samples() if k != demo.BROKEN_KEY]
  broken = next(b for k, b, _, _ in demo.samples() if k == demo.BROKEN_KEY)
  candidates = {f"noise{i}": _noise_jpeg(i) for i in range(4)} | {k: b for k, b, _ in photos[2:]}
  nsfw = load_filter("nsfw", SafetyPolicy.default())
  scores = {k: h[0].score for k, h in zip(candidates, nsfw.score(list(candidates.values())))}
  ranked = sorted(scores, key=scores.get, reverse=True)
  victim, runner_up = ranked[0], ranked[1]
  assert scores[victim] - scores[runner_up] > 1e-3, scores
  threshold = (scores[victim] + scores[runner_up]) / 2
  (k0, b0, e0), (k1, b1, e1) = photos[0], photos[1]
  members = [
      (f"{k0}.{e0}", b0), (f"{k0}.json", b'{"caption": "kept"}'),          # ok, with a sidecar
      ("hashbad.png", b1),                                               # filtered: hash list
      ("nsfwbad.jpg", candidates[victim]),                               # filtered: nsfw
      ("broken.jpg", broken),                                            # decode error: truncated
      ("textonly.txt", b"no image here"),                                # read error: NoImageMember
      ("notanimage.jpg", b"plain text, not an image"),                  # decode error: unidentified
      (f"{k0}.{e0}", b0),                                                # read error: DuplicateKey (#dup1)
      ("copy.png", (tarfile.LNKTYPE, f"{k0}.{e0}")),                     # ok: hard link, the target's bytes
      ("lnk.jpg", (tarfile.SYMTYPE, "/etc/passwd")),                     # read error: not followed
      ("fifo.jpg", (tarfile.FIFOTYPE, "")),                              # read error: not a regular file
      ("clip.0001.png", b0), ("clip.0002.png", b0),                      # ok: a row per frame of one sample
  ]
  want = {k0: ("ok", None), "hashbad": ("filtered", "hashlist"), "nsfwbad": ("filtered", "nsfw"),
          "broken": ("error", "decode"), "textonly": ("error", "read/NoImageMember"),
          "notanimage": ("error", "decode/UnidentifiedImageError"), f"{k0}#dup1": ("error", "read/DuplicateKey"),
          "copy": ("ok", None), "lnk": ("error", "read/UnsupportedMember"), "fifo": ("error", "read/UnsupportedMember"),
          "clip.0001.png": ("ok", None), "clip.0002.png": ("ok", None)}
  return members, want, threshold, hashlib.sha256(b1).hexdigest()


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("matrix")
  ckpt, tok = H.tiny_model(tmp / "model")
  members, want, threshold, bad_hash = _inputs()
  (tmp / "in").mkdir()
  with tarfile.open(tmp / "in" / "m-00000.tar", "w", format=tarfile.GNU_FORMAT) as tar:
    for name, data in members:
      _add(tar, name, data)
  (tmp / "hashes.txt").write_text(f"# known bad\n{bad_hash}  hashbad.png\n")
  safety = {"pii": {"enabled": False}, "nsfw": {"threshold": threshold},
            "hashlist": {"enabled": True, "uri": str(tmp / "hashes.txt")},
            "toxicity": {"threshold": 0.0, "action": "flag"}}   # every text row is scored and flagged
  spec = config.from_dict(H.job("matrix", str(tmp / "in" / "*.tar"), str(tmp / "out") + "/", ckpt, tok,
                                tasks=TASKS, safety=safety), environ={})
  with H.local_ray():
    summary = pipeline.run(spec, progress=False)
  entries = sink.read_manifest(spec.output.uri)
  yield dict(summary=summary, entries=entries, want=want, out=tmp / "out", spec=spec)


def _validator():
  return jsonschema.Draft202012Validator(json.loads(SCHEMA_FILE.read_text()))


def test_every_member_exactly_once_with_its_status_and_reason(matrix):
  s = matrix["summary"]
  assert s.success and s.shards_committed == 1, s
  con = duckdb.connect()
  got = con.sql(f"SELECT key, status, error.stage, error.type, caption_en IS NULL, objects IS NULL, "
                f"safety.decision, list_transform(safety.findings, lambda f: f.filter) "
                f"FROM read_parquet('{matrix['out']}/*.parquet') ORDER BY key").fetchall()
  keys = [g[0] for g in got]
  assert sorted(keys) == sorted(matrix["want"]) and len(keys) == len(set(keys)), keys
  for key, status, stage, type_, no_caption, no_objects, decision, filters in got:
    want_status, why = matrix["want"][key]
    assert status == want_status, (key, status, stage, type_)
    if status == "ok":
      assert stage is None and not no_caption and not no_objects and decision in ("flagged", "redacted"), key
    else:
      assert no_caption and no_objects, key          # withheld rows carry no task results
    if status == "filtered":
      assert stage is None and decision == "filtered" and why in filters, (key, filters)
    if status == "error":
      assert f"{stage}/{type_}".startswith(why), (key, stage, type_)
  assert (s.ok, s.error, s.filtered) == (4, 6, 2)


def test_committed_file_validates_against_the_published_schema(matrix):
  validator = _validator()
  (entry,) = matrix["entries"]
  table = duckdb.connect().sql(f"SELECT * FROM read_parquet('{entry['file']}')").to_arrow_table()
  assert table.num_rows == len(matrix["want"])
  for r in table.to_pylist():
    validator.validate(json.loads(json.dumps(r, default=lambda d: d.isoformat())))
  assert (entry["ok"], entry["error"], entry["filtered"]) == (4, 6, 2)


def test_post_filter_drop_writes_null_task_structs_that_validate(tmp_path):
  """A text filter's drop_content nulls every task column of the row; the Parquet writer accepts those nulls
  (their non-nullable children are valid) and the row validates against the schema."""
  out_schema = schema.output_schema(schema_docs.canonical_tasks())
  n = 2
  text = {"text": "write to someone@example.com", "prompt": "caption en", "num_tokens": 5, "truncated": False}
  cols = {"key": ["a", "b"], "shard": ["s", "s"], "status": ["ok", "ok"],
          "error": rows.null_column(rows.ERROR_TYPE, n), "safety_pre": [None, None]}
  for f in out_schema:
    if f.name not in schema.FIXED_NAMES:
      value = text if f.type == schema.TEXT_TYPE else None
      cols[f.name] = pa.array([value, None] if value else [None, None], f.type)
  post = PostFilter(SafetyPolicy.model_validate({"toxicity": {"enabled": False}, "wordlist": {"enabled": False},
                                                  "pii": {"action": "drop_content"}}),
                    text_fields=["caption_en", "ocr", "vqa"])
  table = post(rows.to_table(cols))
  assert table.column("status").to_pylist() == ["filtered", "ok"]
  s = sink.Sink(str(tmp_path / "out"), out_schema)
  uri = s.commit_shard("s", table)
  back = duckdb.connect().sql(f"SELECT * FROM read_parquet('{uri}') ORDER BY key").to_arrow_table().to_pylist()
  assert back[0]["caption_en"] is None and back[0]["safety"]["decision"] == "filtered"
  for r in back:
    _validator().validate(json.loads(json.dumps(r, default=lambda d: d.isoformat())))


def test_isolate_finds_exactly_the_failing_rows():
  calls = []

  def fn(idx):
    calls.append(list(idx))
    if 3 in idx or 6 in idx:
      raise ValueError("bad row")
    return [i * 10 for i in idx]

  done, failed = rows.isolate(fn, range(8))
  assert done == {i: i * 10 for i in range(8) if i not in (3, 6)} and set(failed) == {3, 6}
  assert all(isinstance(e, ValueError) for e in failed.values())
  assert rows.isolate(fn, []) == ({}, {})
  status, errors = ["ok", "filtered"], [None, None]
  rows.mark_error(status, errors, 0, rows.error("decode", ValueError("x")))
  rows.mark_error(status, errors, 1, rows.error("decode", ValueError("y")))   # first reason wins
  assert status == ["error", "filtered"] and errors == [{"stage": "decode", "type": "ValueError", "message": "x"},
                                                        None]
