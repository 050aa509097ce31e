"""Readers: WebDataset tar, Parquet (binary / HF struct image column) and image files, local and gs:// (emulator)."""
from __future__ import annotations

import gzip
import io
import json
import os
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pgbatch.io import readers
from pgbatch.io.readers import InputError, Shard, list_shards, read_shard

ROW_KEYS = {"key", "shard", "source_uri", "image_bytes", "metadata", "status", "error", "_shard_rows"}


def png(color=(255, 0, 0), size=(4, 3)) -> bytes:
  buf = io.BytesIO()
  Image.new("RGB", size, color).save(buf, "PNG")
  return buf.getvalue()


IMG_A, IMG_B, IMG_C = png((255, 0, 0)), png((0, 255, 0)), png((0, 0, 255))


def tar_bytes(members: list[tuple[str, bytes | None]]) -> bytes:
  """None body = a directory entry."""
  buf = io.BytesIO()
  with tarfile.open(fileobj=buf, mode="w") as tar:
    for name, body in members:
      info = tarfile.TarInfo(name)
      info.mtime = 0
      if body is None:
        info.type = tarfile.DIRTYPE
        tar.addfile(info)
      else:
        info.size = len(body)
        tar.addfile(info, io.BytesIO(body))
  return buf.getvalue()


WDS_MEMBERS = [
    ("a.jpg", IMG_A), ("a.json", b'{"caption": "red", "n": 1}'), ("a.txt", b"hello"), ("a.cls", b" 3\n"),
    ("sub/", None), ("sub/b.png", IMG_B), ("sub/b.meta.json", b'{"x": 2}'),
    ("._c.jpg", b"appledouble junk"),            # hidden: skipped
    ("nojpg.json", b'{"only": "sidecar"}'),     # sample without an image
    ("c.webp", IMG_C), ("c.npy", b"\x93NUMPY"),  # .npy is neither image nor sidecar: ignored
    ("a.jpg", IMG_B),                            # key "a" again later: a duplicate sample
    ("d.JPEG", IMG_C), ("d.jpg", IMG_A),         # two images in one sample: a row each, upper-case ext ok
    ("./e.png", IMG_A),                          # "./" prefix (tar cf x.tar ./) is not part of the key
]


def wds_rows_check(rows: list[dict], shard_id: str, tar_uri: str) -> None:
  by_key = {r["key"]: r for r in rows}
  assert [r["key"] for r in rows] == ["a", "sub/b", "nojpg", "c", "a#dup1", "d.jpeg", "d.jpg", "e"]
  assert all(set(r) == ROW_KEYS for r in rows)
  assert all(r["shard"] == shard_id and r["_shard_rows"] == 8 for r in rows)
  a = by_key["a"]
  assert a["status"] == "ok" and a["error"] is None and a["image_bytes"] == IMG_A
  assert a["source_uri"] == f"{tar_uri}#a.jpg"
  assert json.loads(a["metadata"]) == {"json": {"caption": "red", "n": 1}, "txt": "hello", "cls": "3"}
  b = by_key["sub/b"]
  assert b["image_bytes"] == IMG_B and json.loads(b["metadata"]) == {"meta.json": {"x": 2}}
  assert b["source_uri"] == f"{tar_uri}#sub/b.png"
  no = by_key["nojpg"]
  assert no["status"] == "error" and no["image_bytes"] is None
  assert json.loads(no["metadata"]) == {"json": {"only": "sidecar"}}
  err = no["error"]
  assert err["stage"] == "read" and err["type"] == "NoImageMember" and "nojpg" in err["message"]
  assert by_key["c"]["image_bytes"] == IMG_C and by_key["c"]["metadata"] == "{}"
  dup = by_key["a#dup1"]
  assert dup["status"] == "error" and dup["error"]["type"] == "DuplicateKey"
  assert by_key["d.jpeg"]["image_bytes"] == IMG_C and by_key["d.jpeg"]["source_uri"].endswith("#d.JPEG")
  assert by_key["d.jpg"]["image_bytes"] == IMG_A and by_key["d.jpg"]["source_uri"].endswith("#d.jpg")


@pytest.fixture(scope="module")
def local(tmp_path_factory):
  root = tmp_path_factory.mktemp("readers")
  (root / "wds").mkdir()
  (root / "wds" / "shard-000.tar").write_bytes(tar_bytes(WDS_MEMBERS))
  (root / "wds" / "shard-001.tar").write_bytes(tar_bytes([("x.png", IMG_A)]))
  (root / "wds" / "shard-002.tar.gz").write_bytes(gzip.compress(tar_bytes([("y.png", IMG_B), ("y.txt", b"t")])))
  (root / "wds" / "README.txt").write_text("not a shard")
  return root


# ---------------------------------------------------------------------------------------------------------
# listing

def test_list_shards_glob_dir_braces_file_url(local):
  d = str(local / "wds")
  ids = [s.id for s in list_shards(f"{d}/*.tar", "webdataset")]
  assert ids == [f"{d}/shard-000.tar", f"{d}/shard-001.tar"]
  assert all(s.uris == (s.id,) for s in list_shards(f"{d}/*.tar", "webdataset"))
  # a directory: every tar (also .tar.gz) under it, not the README
  assert [s.id for s in list_shards(d, "webdataset")] == ids + [f"{d}/shard-002.tar.gz"]
  assert [s.id for s in list_shards(f"{d}/shard-{{000..001}}.tar", "webdataset")] == ids
  assert [s.id for s in list_shards(f"{d}/shard-{{001,000}}.tar", "webdataset")] == ids
  assert [s.id for s in list_shards(f"file://{d}/*.tar", "webdataset")] == ids  # same ids: resume-safe
  assert [s.id for s in list_shards(f"{d}/shard-001.tar", "webdataset")] == ids[1:]
  with pytest.raises(InputError, match="matched no tar shards"):
    list_shards(f"{d}/*.nothing", "webdataset")
  with pytest.raises(InputError, match="unknown format 'zip'"):
    list_shards(d, "zip")
  with pytest.raises(InputError, match="files_per_shard"):
    list_shards(d, "images", files_per_shard=0)


def test_expand_braces():
  assert readers.expand_braces("s-{08..11}.tar") == ["s-08.tar", "s-09.tar", "s-10.tar", "s-11.tar"]
  assert readers.expand_braces("{a,b}/{1..2}") == ["a/1", "a/2", "b/1", "b/2"]
  assert readers.expand_braces("plain*.tar") == ["plain*.tar"]


# ---------------------------------------------------------------------------------------------------------
# WebDataset

def test_webdataset_grouping_sidecars_duplicates(local):
  p = str(local / "wds" / "shard-000.tar")
  rows = read_shard(Shard(p, (p,)), "webdataset")
  wds_rows_check(rows, p, p)


def test_webdataset_gzip(local):
  (shard,) = [s for s in list_shards(str(local / "wds"), "webdataset") if s.id.endswith(".gz")]
  rows = read_shard(shard, "webdataset")
  assert [(r["key"], r["status"], r["image_bytes"] == IMG_B, r["metadata"]) for r in rows] == [
      ("y", "ok", True, '{"txt": "t"}')]


def test_webdataset_truncated_missing_garbage_empty(tmp_path):
  full = tar_bytes([("a.png", IMG_A), ("b.png", IMG_B), ("c.png", IMG_C)])
  # cut inside c.png's data: a and b are fine, c becomes the one error row
  cut = full.index(IMG_C) + 10
  (tmp_path / "t.tar").write_bytes(full[:cut])
  rows = read_shard(Shard("t", (str(tmp_path / "t.tar"),)), "webdataset")
  assert [(r["key"], r["status"]) for r in rows] == [("a", "ok"), ("b", "ok"), ("c", "error")]
  e = rows[-1]["error"]
  assert e["stage"] == "read" and e["type"] == "ReadError" and "t.tar" in e["message"]
  assert all(r["_shard_rows"] == 3 for r in rows)
  # the same through gzip: a cut .tar.gz also keeps what precedes the cut and ends in one error row
  noise = [np.random.default_rng(i).bytes(30_000) for i in range(4)]  # incompressible: the cut lands late
  gz = gzip.compress(tar_bytes([(f"n{i}.png", b) for i, b in enumerate(noise)]), mtime=0)
  (tmp_path / "t.tar.gz").write_bytes(gz[:len(gz) - 40])
  rows = read_shard(Shard("z", (str(tmp_path / "t.tar.gz"),)), "webdataset")
  assert [(r["key"], r["status"]) for r in rows] == [("n0", "ok"), ("n1", "ok"), ("n2", "ok"), ("n3", "error")]
  assert rows[0]["image_bytes"] == noise[0] and rows[-1]["error"]["stage"] == "read"
  # cut exactly at a member boundary (no end-of-archive blocks): tarfile alone would end silently
  bound = tar_bytes([("a.png", IMG_A), ("b.png", IMG_B)])
  cut = 512 + (len(IMG_A) + 511) // 512 * 512  # header + padded data of a.png
  assert full[:cut] == bound[:cut]
  (tmp_path / "b.tar").write_bytes(full[:cut])
  rows = read_shard(Shard("b", (str(tmp_path / "b.tar"),)), "webdataset")
  assert [(r["key"], r["status"]) for r in rows] == [("a", "error")]
  assert "end-of-archive" in rows[0]["error"]["message"]
  # garbage where the second header should be
  (tmp_path / "x.tar").write_bytes(full[:cut] + b"\x07" * 2048)
  rows = read_shard(Shard("x", (str(tmp_path / "x.tar"),)), "webdataset")
  assert [(r["key"], r["status"]) for r in rows] == [("a", "error")]
  # cut inside the first header: no sample started, the error row is "__shard__"
  (tmp_path / "h.tar").write_bytes(full[:100])
  rows = read_shard(Shard("h", (str(tmp_path / "h.tar"),)), "webdataset")
  assert [(r["key"], r["status"]) for r in rows] == [("__shard__", "error")]
  # not a tar at all
  (tmp_path / "g.tar").write_bytes(b"garbage" * 200)
  (row,) = read_shard(Shard("g", (str(tmp_path / "g.tar"),)), "webdataset")
  assert row["key"] == "__shard__" and row["error"]["stage"] == "read"
  # missing file (deleted after listing)
  (row,) = read_shard(Shard("m", (str(tmp_path / "missing.tar"),)), "webdataset")
  assert row["key"] == "__shard__" and row["error"]["type"] == "FileNotFoundError"
  # a valid empty tar still yields one row, so the driver sees the shard complete
  (tmp_path / "e.tar").write_bytes(tar_bytes([]))
  (row,) = read_shard(Shard("e", (str(tmp_path / "e.tar"),)), "webdataset")
  assert row["key"] == "__shard__" and row["error"]["type"] == "EmptyShard"
  assert row["_shard_rows"] == 1


# ---------------------------------------------------------------------------------------------------------
# Parquet

def write_parquet_files(write) -> None:
  """write(name, table) for the parquet fixtures."""
  import datetime
  ts = datetime.datetime(2024, 5, 1, 12, 0, tzinfo=datetime.timezone.utc)
  write("binary.parquet", pa.table({
      "key": ["k0", "k1", "k2"], "image": pa.array([IMG_A, None, IMG_C], pa.binary()),
      "caption": ["red", "none", "blue"], "n": [1, 2, 3], "when": [ts, ts, ts]}))
  img = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
  write("hf.parquet", pa.table({
      "img": pa.array([{"bytes": IMG_B, "path": "b.png"}, {"bytes": None, "path": "ext.png"},
                       {"bytes": None, "path": "nowhere.png"}], img),
      "label": [0, 1, 2]}))
  write("noimage.parquet", pa.table({"key": ["a"], "pixels": [b"x"]}))


def test_parquet_binary_column_metadata(tmp_path):
  write_parquet_files(lambda n, t: pq.write_table(t, tmp_path / n))
  p = str(tmp_path / "binary.parquet")
  rows = read_shard(Shard(p, (p,)), "parquet")
  assert [(r["key"], r["status"]) for r in rows] == [("k0", "ok"), ("k1", "error"), ("k2", "ok")]
  assert rows[0]["image_bytes"] == IMG_A and rows[2]["image_bytes"] == IMG_C
  assert rows[0]["source_uri"] == f"{p}#row0"
  assert json.loads(rows[0]["metadata"]) == {"caption": "red", "n": 1, "when": "2024-05-01T12:00:00+00:00"}
  assert rows[1]["error"]["type"] == "MissingImage"
  # no key column configured: zero-padded row numbers
  rows = read_shard(Shard(p, (p,)), "parquet", key_column=None)
  assert [r["key"] for r in rows] == ["000000", "000001", "000002"]
  assert "key" in json.loads(rows[0]["metadata"])


def test_parquet_hf_struct_and_external_paths(tmp_path):
  write_parquet_files(lambda n, t: pq.write_table(t, tmp_path / n))
  (tmp_path / "ext.png").write_bytes(IMG_A)
  p = str(tmp_path / "hf.parquet")
  rows = read_shard(Shard(p, (p,)), "parquet", image_column="img", key_column="id")  # no "id": row numbers
  assert [(r["key"], r["status"]) for r in rows] == [("000000", "ok"), ("000001", "ok"), ("000002", "error")]
  assert rows[0]["image_bytes"] == IMG_B
  assert rows[1]["image_bytes"] == IMG_A  # bytes null: read from the path, relative to the parquet file
  assert rows[1]["source_uri"] == f"{p}#row1"
  e = rows[2]["error"]
  assert e["stage"] == "read" and e["type"] == "FileNotFoundError" and "nowhere.png" in e["message"]
  assert json.loads(rows[0]["metadata"]) == {"label": 0, "image_path": "b.png"}
  assert json.loads(rows[1]["metadata"]) == {"label": 1}


def test_parquet_bad_files(tmp_path):
  write_parquet_files(lambda n, t: pq.write_table(t, tmp_path / n))
  p = str(tmp_path / "noimage.parquet")
  (row,) = read_shard(Shard(p, (p,)), "parquet")
  e = row["error"]
  assert row["key"] == "__shard__" and e["stage"] == "read" and "'image'" in e["message"] and "pixels" in e["message"]
  good = (tmp_path / "binary.parquet").read_bytes()
  (tmp_path / "cut.parquet").write_bytes(good[:len(good) // 2])
  (row,) = read_shard(Shard("c", (str(tmp_path / "cut.parquet"),)), "parquet")
  assert row["key"] == "__shard__" and row["status"] == "error"
  # duplicate keys in a parquet file: later ones become error rows, nothing dropped
  pq.write_table(pa.table({"key": ["x", "x", "y"], "image": [IMG_A, IMG_B, IMG_C]}), tmp_path / "dup.parquet")
  rows = read_shard(Shard("d", (str(tmp_path / "dup.parquet"),)), "parquet")
  assert [(r["key"], r["status"]) for r in rows] == [("x", "ok"), ("x#dup1", "error"), ("y", "ok")]


def test_parquet_many_row_groups(tmp_path):
  n = 600
  t = pa.table({"key": [f"k{i:04d}" for i in range(n)], "image": [IMG_A] * n})
  pq.write_table(t, tmp_path / "big.parquet", row_group_size=100)
  rows = read_shard(Shard("b", (str(tmp_path / "big.parquet"),)), "parquet")
  assert [r["key"] for r in rows] == t["key"].to_pylist() and rows[0]["_shard_rows"] == n
  # a directory of parquet: "_"/"." files and folders (Spark/pyarrow dataset convention) are not shards
  (tmp_path / "_temporary").mkdir()
  pq.write_table(t, tmp_path / "_temporary" / "part-0.parquet")
  pq.write_table(t, tmp_path / "_common_metadata.parquet")
  assert [s.id for s in list_shards(str(tmp_path), "parquet")] == [str(tmp_path / "big.parquet")]


# ---------------------------------------------------------------------------------------------------------
# image files

def test_images_chunked_per_directory(tmp_path):
  for d, n in (("a", 5), ("b", 2)):
    (tmp_path / d).mkdir()
    for i in range(n):
      (tmp_path / d / f"img{i}.png").write_bytes(png((i * 40, 0, 0)))
  (tmp_path / "a" / "notes.txt").write_text("skip me")
  (tmp_path / "a" / ".hidden.png").write_bytes(IMG_A)
  (tmp_path / "a" / ".thumbs").mkdir()
  (tmp_path / "a" / ".thumbs" / "t.png").write_bytes(IMG_A)
  (tmp_path / "b" / "_DSC0001.JPG").write_bytes(IMG_A)  # camera names with "_" are images
  (tmp_path / "a" / "bad.jpg").write_bytes(b"text named .jpg")  # listed: decode will reject it
  shards = list_shards(str(tmp_path), "images", files_per_shard=2)
  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  assert [s.id for s in shards] == [f"{a}/bad.jpg+2", f"{a}/img1.png+2", f"{a}/img3.png+2",
                                    f"{b}/_DSC0001.JPG+2", f"{b}/img1.png+1"]
  assert shards[0].uris == (f"{a}/bad.jpg", f"{a}/img0.png")
  assert sum(len(s.uris) for s in shards) == 9
  rows = read_shard(shards[0], "images")
  assert [(r["key"], r["status"], r["source_uri"]) for r in rows] == [
      ("bad.jpg", "ok", f"{a}/bad.jpg"), ("img0.png", "ok", f"{a}/img0.png")]
  assert rows[1]["image_bytes"] == (tmp_path / "a" / "img0.png").read_bytes()
  # a glob of images skips non-image files
  assert [s.id for s in list_shards(f"{a}/*", "images")] == [f"{a}/bad.jpg+6"]
  # a file that vanished after listing is one error row
  os.unlink(tmp_path / "b" / "img1.png")
  rows = read_shard(shards[-1], "images")
  assert [(r["key"], r["status"]) for r in rows] == [("img1.png", "error")]
  assert rows[0]["error"]["type"] == "FileNotFoundError" and rows[0]["_shard_rows"] == 1


# ---------------------------------------------------------------------------------------------------------
# gs:// through gcsfs (loopback emulator)

def test_gcs_all_formats(gcs, tmp_path):
  fs, bucket = gcs
  base = f"{bucket}/readers"
  fs.pipe(f"{base}/wds/shard-000.tar", tar_bytes(WDS_MEMBERS))
  fs.pipe(f"{base}/wds/shard-001.tar", tar_bytes([("x.png", IMG_A)]))
  fs.pipe(f"{base}/wds/_tmp.txt", b"x")

  def put(name, table):
    buf = io.BytesIO()
    pq.write_table(table, buf)
    fs.pipe(f"{base}/pq/{name}", buf.getvalue())
  write_parquet_files(put)
  fs.pipe(f"{base}/pq/ext.png", IMG_A)
  for i in range(3):
    fs.pipe(f"{base}/img/p{i}.png", png((0, 0, i)))
  fs.pipe(f"{base}/img/readme.md", b"x")

  g = f"gs://{base}"
  shards = list_shards(f"{g}/wds/*.tar", "webdataset")
  assert [s.id for s in shards] == [f"{g}/wds/shard-000.tar", f"{g}/wds/shard-001.tar"]
  assert [s.id for s in list_shards(f"{g}/wds/shard-{{000..001}}.tar", "webdataset")] == [s.id for s in shards]
  assert [s.id for s in list_shards(f"{g}/wds", "webdataset")] == [s.id for s in shards]
  wds_rows_check(read_shard(shards[0], "webdataset"), shards[0].id, shards[0].id)

  pqs = list_shards(f"{g}/pq/*.parquet", "parquet")
  assert [s.id.rsplit("/", 1)[1] for s in pqs] == ["binary.parquet", "hf.parquet", "noimage.parquet"]
  rows = read_shard(pqs[0], "parquet")
  assert [(r["key"], r["status"], r["image_bytes"]) for r in rows] == [
      ("k0", "ok", IMG_A), ("k1", "error", None), ("k2", "ok", IMG_C)]
  rows = read_shard(pqs[1], "parquet", image_column="img")
  assert [r["image_bytes"] for r in rows[:2]] == [IMG_B, IMG_A]  # external path resolved in the bucket
  assert read_shard(pqs[2], "parquet")[0]["key"] == "__shard__"

  (ims,) = list_shards(f"{g}/img", "images")
  assert ims.id == f"{g}/img/p0.png+3"
  rows = read_shard(ims, "images")
  assert [(r["key"], r["source_uri"]) for r in rows] == [(f"p{i}.png", f"{g}/img/p{i}.png") for i in range(3)]
  assert rows[2]["image_bytes"] == png((0, 0, 2))

  (row,) = read_shard(Shard("gone", (f"{g}/wds/missing.tar",)), "webdataset")
  assert row["key"] == "__shard__" and row["error"]["type"] == "FileNotFoundError"
  with pytest.raises(InputError):
    list_shards(f"{g}/nothing/*.tar", "webdataset")


# ---------------------------------------------------------------------------------------------------------
# every member accounted for


def _special(name: str, type_: bytes, linkname: str = "") -> tarfile.TarInfo:
  info = tarfile.TarInfo(name)
  info.type, info.linkname, info.mtime = type_, linkname, 0
  return info


def test_every_tar_member_is_a_row(tmp_path):
  """Hard links read their target; symlinks, FIFOs, devices are error rows; frames of one sample and two
  image formats of one key are a row each, keyed by member; a link to nothing is an error row."""
  buf = io.BytesIO()
  with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
    def add(name, data):
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
    add("orig.png", IMG_A)
    tar.addfile(_special("copy.png", tarfile.LNKTYPE, "orig.png"))        # GNU tar: second name of a file
    tar.addfile(_special("lnk.png", tarfile.SYMTYPE, "/etc/passwd"))
    tar.addfile(_special("pipe.jpg", tarfile.FIFOTYPE))
    tar.addfile(_special("dev.jpg", tarfile.CHRTYPE))
    add("frame.0001.png", IMG_B)
    add("frame.0002.png", IMG_C)
    add("frame.json", b'{"clip": 7}')
    add("x.jpg", IMG_A)
    add("x.png", IMG_B)
    tar.addfile(_special("gone.png", tarfile.LNKTYPE, "never-there.png"))
  (tmp_path / "t.tar").write_bytes(buf.getvalue())
  rows = read_shard(Shard("t", (str(tmp_path / "t.tar"),)), "webdataset")
  got = {r["key"]: r for r in rows}
  assert sorted(got) == sorted(["orig", "copy", "lnk", "pipe", "dev", "frame.0001.png", "frame.0002.png",
                                "x.jpg", "x.png", "gone"]) and len(rows) == len(got)
  assert got["copy"]["status"] == "ok" and got["copy"]["image_bytes"] == IMG_A
  for k in ("lnk", "pipe", "dev"):
    assert got[k]["status"] == "error" and got[k]["error"]["type"] == "UnsupportedMember", got[k]
  assert "not followed" in got["lnk"]["error"]["message"] and got["lnk"]["image_bytes"] is None
  assert got["gone"]["error"]["type"] == "BrokenHardLink"
  assert got["frame.0001.png"]["image_bytes"] == IMG_B and got["frame.0002.png"]["image_bytes"] == IMG_C
  assert json.loads(got["frame.0002.png"]["metadata"]) == {"json": {"clip": 7}}   # the sample's sidecars, shared
  assert got["frame.0001.png"]["source_uri"].endswith("#frame.0001.png")
  assert got["x.jpg"]["image_bytes"] == IMG_A and got["x.png"]["image_bytes"] == IMG_B


def test_null_parquet_keys_never_take_a_real_key(tmp_path):
  p = str(tmp_path / "k.parquet")
  pq.write_table(pa.table({"key": ["#row1", None, "000002", None],
                           "image": [IMG_A, IMG_B, IMG_C, IMG_A]}), p)
  rows = read_shard(Shard(p, (p,)), "parquet")
  assert [r["key"] for r in rows] == ["#row1", "#row1#", "000002", "#row3"]
  assert all(r["status"] == "ok" for r in rows)


def test_listing_takes_what_the_decoder_opens_and_counts_what_it_skips(tmp_path, caplog):
  for name in ("a.avif", "b.jfif", "c.jpe", "d.jp2", "e.ppm", "f.qoi", "g.JPG", "notes.txt", "h.tga", ".i.png"):
    (tmp_path / name).write_bytes(b"x")
  with caplog.at_level("WARNING", logger="pgbatch.io.readers"):
    fs, found, skipped = readers.list_inputs(str(tmp_path), "images")
  assert [os.path.basename(p) for p in found] == ["a.avif", "b.jfif", "c.jpe", "d.jp2", "e.ppm", "f.qoi", "g.JPG"]
  assert skipped == {"not an image extension": 2, "hidden": 1}
  assert "skipped 3 listed file(s): 1 hidden, 2 not an image extension" in caplog.text
  from pgbatch.io import decode
  assert set(readers.IMAGE_EXTENSIONS) == set(decode.image_extensions()) >= {"jpg", "png", "webp", "avif"}


def test_image_shards_leave_out_done_images_and_keep_ids_stable(tmp_path):
  uris = [f"/d/{n}.jpg" for n in ("a", "b", "c", "d", "e")] + ["/e/z.jpg"]
  first = readers.image_shards(uris, 2)
  assert [s.id for s in first] == ["/d/a.jpg+2", "/d/c.jpg+2", "/d/e.jpg+1", "/e/z.jpg+1"]
  assert readers.image_shards(uris, 2) == first                       # deterministic
  done = {u for s in first for u in s.uris}
  grown = uris + ["/d/0.jpg", "/d/bb.jpg", "/d/f.jpg"]
  again = readers.image_shards(grown, 2, done)
  assert [s.uris for s in again] == [("/d/0.jpg", "/d/bb.jpg"), ("/d/f.jpg",)]
  assert not {s.id for s in again} & {s.id for s in first}


def test_tar_and_parquet_shards_carry_their_object_version(local):
  shards = list_shards(str(local / "wds"), "webdataset")
  assert all(s.version["size"] > 0 and "mtime" in s.version for s in shards)
  assert readers.version_changed({"size": 1, "mtime": 2.0}, {"size": 1, "mtime": 3.0}) == ["mtime"]
  assert readers.version_changed({"size": 1, "generation": "5"}, {"size": 1, "generation": "5", "etag": "x"}) == []
