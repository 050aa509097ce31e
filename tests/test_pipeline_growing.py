"""A folder of image files that grows between runs (the nightly-bucket case), on local disk and on the GCS
emulator: files added that sort first, in the middle and last are annotated by the rerun, once each; every image
is in the output exactly once; the first run's files are untouched, byte for byte."""
import hashlib

import pytest

from pgbatch import config, demo, pipeline
from tests import pipeline_helpers as H

FIRST = [f"b-{i:02d}.jpg" for i in range(0, 20, 2)]       # 10 images: b-00, b-02, ..., b-18
ADDED = ["a-00.jpg", "b-07.jpg", "c-00.jpg"]               # sort first, in the middle, last


def _photo(i: int) -> bytes:
  photos = [b for k, b, e, _ in demo.samples() if k != demo.BROKEN_KEY and e == "jpg"] or \
      [b for k, b, _, _ in demo.samples() if k != demo.BROKEN_KEY]
  return photos[i % len(photos)]


@pytest.fixture(scope="module")
def ray_session(gcs):
  with H.local_ray() as ray:
    yield ray


def _grow(put, ls_bytes, read_out, input_uri: str, output_uri: str, ckpt: str, tok: str) -> dict:
  """Run, add ADDED, rerun, rerun again; returns what the tests check."""
  for i, name in enumerate(FIRST):
    put(name, _photo(i))
  spec = config.from_dict(H.job("grow", input_uri, output_uri, ckpt, tok, fmt="images", fast_safety=True,
                                tasks=[{"name": "caption_en", "kind": "caption", "lang": "en",
                                        "max_new_tokens": 2}],
                                input={"uri": input_uri, "format": "images", "files_per_shard": 4}), environ={})
  first = pipeline.run(spec, progress=False)
  before = ls_bytes()
  for i, name in enumerate(ADDED):
    put(name, _photo(i + 3))
  second = pipeline.run(spec, progress=False)
  third = pipeline.run(spec, progress=False)
  entries, tables = read_out(spec.output.uri)
  return dict(first=first, second=second, third=third, before=before, after=ls_bytes(), entries=entries,
              tables=tables)


def _check(g: dict, uri_of) -> None:
  first, second, third = g["first"], g["second"], g["third"]
  assert first.success and (first.images, first.shards_committed) == (10, 3), first
  assert second.success and second.images == len(ADDED), second          # N annotations, not a re-listing
  assert second.shards_skipped == 3 and second.shards_committed == 1, second
  assert third.success and third.images == 0 and third.shards_committed == 0, third
  seen: dict[str, int] = {}
  for t in g["tables"].values():
    assert len(set(t.column("key").to_pylist())) == t.num_rows
    for u, st in zip(t.column("source_uri").to_pylist(), t.column("status").to_pylist()):
      seen[u] = seen.get(u, 0) + 1
      assert st == "ok", u
  want = {uri_of(n) for n in FIRST + ADDED}
  assert set(seen) == want and all(n == 1 for n in seen.values()), seen      # M + N rows, each image once
  for name, digest in g["before"].items():                                   # first run's files: same bytes
    assert g["after"][name] == digest, name
  assert len(g["after"]) == len(g["before"]) + 2   # one new data file, one new marker
  added = [e for e in g["entries"] if e["run_id"] == second.run_id]
  assert len(added) == 1 and sorted(added[0]["sources"]) == sorted(uri_of(n) for n in ADDED)


def test_growing_local_folder(ray_session, tmp_path):
  ckpt, tok = H.tiny_model(tmp_path / "model")
  inp, out = tmp_path / "in", tmp_path / "out"
  inp.mkdir()

  def put(name, data):
    (inp / name).write_bytes(data)

  def ls_bytes():
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in out.rglob("*")
            if p.is_file()}

  g = _grow(put, ls_bytes, H.read_output, str(inp), str(out) + "/", ckpt, tok)
  _check(g, lambda n: str(inp / n))


def test_growing_bucket_on_the_gcs_emulator(ray_session, gcs, tmp_path):
  fs, bucket = gcs
  ckpt, tok = H.tiny_model(tmp_path / "model")
  prefix = f"{bucket}/grow"

  def put(name, data):
    fs.pipe(f"{prefix}/in/{name}", data)

  def ls_bytes():
    fs.invalidate_cache()
    return {p: hashlib.sha256(fs.cat(p)).hexdigest() for p in fs.find(f"{prefix}/out")}

  def read_out(uri):
    fs.invalidate_cache()   # this test's own listing of out/ (ls_bytes) predates the later runs
    return H.read_output(uri, fs)

  g = _grow(put, ls_bytes, read_out, f"gs://{prefix}/in/", f"gs://{prefix}/out/", ckpt, tok)
  _check(g, lambda n: f"gs://{prefix}/in/{n}")
