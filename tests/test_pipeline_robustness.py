"""A shard full of bad inputs (tests/bad_images.py) plus broken shards, through `pgbatch run` in a subprocess:
every key comes out exactly once with the right status and reason, and the job exits 0."""
import io
import json
import tarfile

import pytest
import yaml

from pgbatch import demo
from tests import bad_images
from tests import pipeline_helpers as H


@pytest.fixture(scope="module")
def robust(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("robust")
  ckpt, tok = H.tiny_model(tmp / "model")
  shards = tmp / "shards"
  shards.mkdir()
  samples = bad_images.bad_samples()
  bad_images.write_webdataset(str(shards / "a-bad-images.tar"), samples)
  photos = [s for s in demo.samples() if s[0] != demo.BROKEN_KEY][:3]
  demo.write_shards(tmp / "full", photos, shards=1, prefix="b")
  full = (tmp / "full" / "b-00000.tar").read_bytes()
  (shards / "b-cut.tar").write_bytes(full[:len(photos[0][1]) + 3000])  # ends inside the second image
  buf = io.BytesIO()
  tarfile.open(fileobj=buf, mode="w").close()
  (shards / "c-empty.tar").write_bytes(buf.getvalue())
  (shards / "d-zero-bytes.tar").write_bytes(b"")
  out = tmp / "out"
  spec = H.job("robust", str(shards / "*.tar"), str(out) + "/", ckpt, tok, fast_safety=True)
  (tmp / "job.yaml").write_text(yaml.safe_dump(spec))
  proc = H.run_cli("run", str(tmp / "job.yaml"), "--no-progress", "--verbose")
  entries, tables = H.read_output(str(out))
  rows = [r for t in tables.values() for r in t.to_pylist()]
  yield dict(proc=proc, rows=rows, entries=entries, samples=samples, photos=photos, shards=shards, out=out)


def test_job_exits_zero_and_commits_every_shard(robust):
  p = robust["proc"]
  assert p.returncode == 0, p.stdout + p.stderr
  assert "pgbatch: robust:" in p.stdout and "in 4/4 shards" in p.stdout
  assert p.stderr.count("pgbatch.pipeline.driver: committed ") == 4, p.stderr[-3000:]
  assert "\n  errors: read/ReadError 2, decode/" in p.stdout, p.stdout
  assert sorted(e["shard"] for e in robust["entries"]) == sorted(str(x) for x in robust["shards"].glob("*.tar"))
  assert not list(robust["out"].glob("_tmp/*")) and sorted(x.name for x in robust["out"].iterdir()) == sorted(
      ["_manifest"] + [e["name"] for e in robust["entries"]])


def test_bad_images_each_once_with_the_right_status(robust):
  shard = str(robust["shards"] / "a-bad-images.tar")
  got = {}
  for r in robust["rows"]:
    if r["shard"] == shard:
      assert r["key"] not in got, f"{r['key']} twice"
      got[r["key"]] = r
  assert sorted(got) == [k for k, _, _ in robust["samples"]]
  for key, _, status in robust["samples"]:
    r = got[key]
    assert r["status"] == status, (key, r["status"], r["error"])
    if status == "error":
      assert r["error"]["stage"] == "decode" and r["error"]["type"] == bad_images.EXPECTED_ERROR_TYPES[key], r
      assert r["caption_en"] is None and r["provenance"]["job_id"].startswith("robust/")
    else:
      assert r["error"] is None
      assert (r["width"], r["height"]) == bad_images.EXPECTED_SIZES[key], key
      assert r["caption_en"]["prompt"] == "caption en" and r["caption_en"]["num_tokens"] >= 1
      assert r["safety"]["decision"] in ("pass", "flagged", "redacted")


def test_broken_shards_become_error_rows_not_failures(robust):
  by_shard = {}
  for r in robust["rows"]:
    by_shard.setdefault(r["shard"].rsplit("/", 1)[-1], []).append(r)
  cut = {r["key"]: r for r in by_shard["b-cut.tar"]}
  first = robust["photos"][0][0]
  assert len(cut) == len(by_shard["b-cut.tar"]) == 2
  assert cut[first]["status"] == "ok"
  (err,) = [r for r in cut.values() if r["status"] == "error"]
  assert err["error"]["stage"] == "read" and err["key"] != first
  for name in ("c-empty.tar", "d-zero-bytes.tar"):
    (r,) = by_shard[name]
    assert r["status"] == "error" and r["error"]["stage"] == "read", r


def test_manifest_counts_error_reasons(robust):
  entry = next(e for e in robust["entries"] if e["shard"].endswith("a-bad-images.tar"))
  want = {}
  for k, t in bad_images.EXPECTED_ERROR_TYPES.items():
    want[f"decode/{t}"] = want.get(f"decode/{t}", 0) + 1
  assert entry["errors"] == want, json.dumps(entry)
  assert entry["ok"] == len(bad_images.EXPECTED_SIZES) and entry["error"] == len(bad_images.EXPECTED_ERROR_TYPES)
