"""Decode stage: the robustness set, every PIL mode, EXIF orientation, bomb limit, decode_batch contract."""
from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pgbatch.io import decode
from pgbatch.io.decode import DecodeError, decode_batch, decode_image
from tests import bad_images
from tests.bad_images import EXPECTED_ERROR_TYPES, EXPECTED_SIZES, bad_samples

SIZE = 32


def save(im: Image.Image, fmt: str, **kw) -> bytes:
  buf = io.BytesIO()
  im.save(buf, fmt, **kw)
  return buf.getvalue()


@pytest.fixture(scope="module")
def samples():
  return bad_samples()


def test_robustness_set_outcomes(samples):
  assert {k for k, _, s in samples if s == "error"} == set(EXPECTED_ERROR_TYPES)
  assert {k for k, _, s in samples if s == "ok"} == set(EXPECTED_SIZES)
  for key, data, status in samples:
    if status == "ok":
      px, w, h = decode_image(data, SIZE)
      assert px.shape == (SIZE, SIZE, 3) and px.dtype == np.uint8, key
      assert (w, h) == EXPECTED_SIZES[key], key
    else:
      with pytest.raises(DecodeError) as e:
        decode_image(data, SIZE)
      assert e.value.type_ == EXPECTED_ERROR_TYPES[key], (key, e.value.type_, str(e.value))
      assert str(e.value)


def test_pixel_semantics(samples):
  px = {k: decode_image(d, SIZE)[0] for k, d, s in samples if s == "ok"}
  red, white = np.array([255, 0, 0]), np.array([255, 255, 255])
  # EXIF orientation 6: the stored left (red) half is shown on top, the blue half at the bottom
  rot = px["exif_rotated"].astype(int)
  assert np.abs(rot[2, SIZE // 2] - red).max() < 12 and np.abs(rot[-3, SIZE // 2] - [0, 0, 255]).max() < 12
  assert np.abs(px["animated_gif"].astype(int) - red).max() < 2  # first frame only
  pal = px["palette_transparent"].astype(int)                  # transparent index 0 -> white, not black
  assert (pal[:, :SIZE // 2 - 1] == white).all() and (pal[:, SIZE // 2 + 1:] == [0, 200, 0]).all()
  rgba = px["rgba_png"].astype(int)
  assert (rgba[:, :SIZE // 2 - 1] == white).all() and (rgba[:, SIZE // 2 + 1:] == red).all()
  la = px["la_png"].astype(int)
  assert (la[:, :SIZE // 2 - 2] == 100).all() and (la[:, SIZE // 2 + 2:] == 255).all()
  g16 = px["png_16bit"]                                        # 0..65535 ramp -> 0..255, gray, monotone
  assert g16[0, 0, 0] <= 8 and g16[0, -1, 0] >= 247 and (np.diff(g16[0, :, 0].astype(int)) >= 0).all()
  assert (g16[..., 0] == g16[..., 1]).all() and 100 < g16[0, SIZE // 2, 0] < 156
  assert (px["one_by_one"] == [10, 20, 30]).all()
  # CMYK comes back close to the RGB gradient it was made from
  rgb = decode_image(save(Image.fromarray(bad_images._gradient(64, 48)), "PNG"), SIZE)[0].astype(int)
  assert np.abs(px["cmyk_jpeg"].astype(int) - rgb).mean() < 8


@pytest.mark.parametrize("mode,fmt", [
    ("1", "PNG"), ("L", "PNG"), ("LA", "PNG"), ("P", "PNG"), ("RGBA", "PNG"), ("I", "TIFF"), ("F", "TIFF"),
    ("I;16", "TIFF"), ("CMYK", "TIFF"), ("YCbCr", "JPEG"), ("RGB", "BMP"), ("RGB", "WEBP"), ("LAB", "TIFF"),
    ("RGBX", "TIFF")])
def test_every_mode_to_rgb(mode, fmt):
  base = Image.fromarray(bad_images._gradient(20, 10))
  im = base.convert(mode) if mode not in ("I", "F", "I;16") else None
  if mode == "I":
    im = Image.fromarray((np.arange(200).reshape(10, 20) * 300).astype(np.int32))  # 0..59700: scaled by 1/257
  elif mode == "F":
    im = Image.fromarray(np.linspace(0, 1, 200, dtype=np.float32).reshape(10, 20))  # [0, 1]: scaled by 255
  elif mode == "I;16":
    im = Image.fromarray((np.arange(200).reshape(10, 20) * 300).astype(np.uint16))
  px, w, h = decode_image(save(im, fmt), SIZE)
  assert px.shape == (SIZE, SIZE, 3) and (w, h) == (20, 10)
  if mode in ("I", "F", "I;16"):
    assert px[0, 0, 0] <= 1 and px[-1, -1, 0] >= 230  # full range used, not clipped to white
  else:
    assert px.std() > 10  # not a constant image


def test_exif_orientations_swap():
  a = np.zeros((10, 30, 3), np.uint8)
  for o in range(1, 9):
    exif = Image.Exif()
    exif[0x0112] = o
    _, w, h = decode_image(save(Image.fromarray(a), "JPEG", exif=exif.tobytes()), SIZE)
    assert (w, h) == ((10, 30) if o >= 5 else (30, 10)), o


def test_pixel_limit_before_decoding():
  # a big-dimension image that stays small compressed: 3000 x 2000 zeros is ~10 kB of PNG
  data = save(Image.new("L", (3000, 2000)), "PNG")
  assert len(data) < 50_000
  with pytest.raises(DecodeError) as e:
    decode_image(data, SIZE, max_pixels=5_000_000)
  assert e.value.type_ == "DecompressionBombError" and (e.value.width, e.value.height) == (3000, 2000)
  assert "6000000" in str(e.value) and "5000000" in str(e.value)
  assert decode_image(data, SIZE, max_pixels=6_000_000)[1:] == (3000, 2000)
  # PIL's own limit is raised to ours when ours is higher (never lowered), so ours is the one that applies
  saved = Image.MAX_IMAGE_PIXELS
  try:
    decode_image(save(Image.new("L", (8, 8)), "PNG"), SIZE, max_pixels=saved * 3)
    assert Image.MAX_IMAGE_PIXELS == saved * 3
    decode_image(save(Image.new("L", (8, 8)), "PNG"), SIZE, max_pixels=100)
    assert Image.MAX_IMAGE_PIXELS == saved * 3
  finally:
    Image.MAX_IMAGE_PIXELS = saved


def test_large_jpeg_reduced_decode_matches_full():
  rng = np.random.default_rng(1)
  small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
  big = Image.fromarray(small).resize((1600, 1200), Image.Resampling.BICUBIC)
  data = save(big, "JPEG", quality=92)
  px, w, h = decode_image(data, 224)
  assert (w, h) == (1600, 1200)
  full = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize((224, 224), Image.Resampling.BILINEAR))
  assert np.abs(px.astype(int) - full.astype(int)).mean() < 3


def test_truncated_png_and_corrupt_data():
  data = save(Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)), "PNG")
  with pytest.raises(DecodeError) as e:
    decode_image(data[:len(data) // 2], SIZE)
  assert e.value.type_ in ("TruncatedImageError", "CorruptImageError") and e.value.width == 64
  with pytest.raises(DecodeError) as e:  # a PNG signature followed by garbage
    decode_image(data[:8] + bytes(range(256)) * 4, SIZE)
  assert e.value.type_ in ("CorruptImageError", "UnidentifiedImageError") and e.value.width == -1


def test_decode_batch_contract(samples):
  keys = [k for k, _, _ in samples] + ["read_failed"]
  datas = [d for _, d, _ in samples] + [None]
  read_err = {"stage": "read", "type": "NoImageMember", "message": "m"}
  batch = {
      "key": np.array(keys, object), "image_bytes": np.array(datas, object),
      "status": np.array(["ok"] * len(samples) + ["error"], object),
      "error": np.array([None] * len(samples) + [read_err], object),
      "metadata": np.array(["{}"] * len(keys), object)}
  out = decode_batch(batch, SIZE)
  n = len(keys)
  assert out["pixels"].shape == (n, SIZE, SIZE, 3) and out["pixels"].dtype == np.uint8
  assert out["width"].dtype == np.int32 and out["height"].dtype == np.int32
  assert list(out["key"]) == keys and list(out["metadata"]) == ["{}"] * n
  want = {k: s for k, _, s in samples} | {"read_failed": "error"}
  for i, k in enumerate(keys):
    assert out["status"][i] == want[k], k
    if k == "read_failed":
      assert out["error"][i] == read_err and out["sha256"][i] is None and out["width"][i] == -1
      continue
    assert out["sha256"][i] == hashlib.sha256(datas[i]).hexdigest()
    if want[k] == "ok":
      assert out["error"][i] is None and (out["width"][i], out["height"][i]) == EXPECTED_SIZES[k]
      assert out["pixels"][i].any()
    else:
      e = out["error"][i]
      assert e == {"stage": "decode", "type": EXPECTED_ERROR_TYPES[k], "message": e["message"]} and e["message"]
      assert not out["pixels"][i].any()
  # the input batch is not modified
  assert list(batch["status"]).count("error") == 1
  assert decode.DEFAULT_MAX_PIXELS == Image.MAX_IMAGE_PIXELS or Image.MAX_IMAGE_PIXELS >= decode.DEFAULT_MAX_PIXELS


def test_bad_shard_read_then_decode(tmp_path, samples):
  """The robustness tar through read_shard + decode_batch: every key exactly once, with the right status."""
  from pgbatch.io import readers
  path = bad_images.write_webdataset(str(tmp_path / "bad.tar"), samples)
  rows = readers.read_shard(readers.Shard(path, (path,)), "webdataset")
  assert all(r["_shard_rows"] == len(samples) for r in rows)
  cols = {k: np.array([r[k] for r in rows], dtype=object) for k in rows[0]}
  out = decode_batch(cols, SIZE)
  got = {k: (s, e["type"] if e else None) for k, s, e in zip(out["key"], out["status"], out["error"])}
  assert len(got) == len(rows) == len(samples)
  for key, _, status in samples:
    assert got[key] == (status, EXPECTED_ERROR_TYPES.get(key)), key
  for i, k in enumerate(out["key"]):
    assert json.loads(out["metadata"][i])["json"]["expected"] == got[k][0]
    if got[k][0] == "ok":
      assert (int(out["width"][i]), int(out["height"][i])) == EXPECTED_SIZES[k]


def test_only_allowed_formats():
  eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
  with pytest.raises(DecodeError) as e:
    decode_image(eps, SIZE)
  assert e.value.type_ == "UnidentifiedImageError"
  for fmt in ("JPEG", "PNG", "WEBP", "GIF", "TIFF", "BMP", "PPM", "ICO"):
    px, w, h = decode_image(save(Image.new("RGB", (16, 16), (9, 99, 199)), fmt), SIZE)
    assert (w, h) == (16, 16) and np.abs(px.astype(int) - [9, 99, 199]).max() < 12, fmt


def png16_bomb(width: int = 13000, height: int = 13000, rows_per_block: int = 100) -> bytes:
  """A 16-bit gray PNG of width x height zeros (~330 KB for 13000 x 13000), built in under a second: one
  deflate block of `rows_per_block` rows, ended by a full flush (so it stands alone), repeated."""
  import struct
  import zlib

  def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
  assert height % rows_per_block == 0
  rows = (b"\x00" * (1 + 2 * width)) * rows_per_block  # filter byte 0 + the row's samples
  z = zlib.compressobj(9, zlib.DEFLATED, -15)
  block = z.compress(rows) + z.flush(zlib.Z_FULL_FLUSH)
  adler = 1
  for _ in range(height // rows_per_block):
    adler = zlib.adler32(rows, adler)
  stream = (b"\x78\xda" + block * (height // rows_per_block) + zlib.compressobj(9, zlib.DEFLATED, -15).flush()
            + struct.pack(">I", adler))
  ihdr = struct.pack(">IIBBBBB", width, height, 16, 0, 0, 0, 0)
  return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", stream) + chunk(b"IEND", b"")


def test_png16_bomb_is_a_valid_png():
  small = png16_bomb(300, 200, rows_per_block=50)
  im = Image.open(io.BytesIO(small))
  assert (im.size, im.mode) == ((300, 200), "I;16") and np.asarray(im).max() == 0


def test_decode_budget_refuses_a_16_bit_bomb_before_decoding(tmp_path):
  """13000 x 13000 16-bit: 338 MB decoded (4 GiB and 24 s with float64 conversion) from a 320 KB file. With a
  budget it is a DecodeBudgetError naming the limit, in a process whose peak memory stays far below it."""
  import subprocess
  import sys
  data = png16_bomb()
  assert len(data) < 400_000
  (tmp_path / "bomb.png").write_bytes(data)
  script = (
      "import json, resource, sys, numpy as np\n"
      "from pgbatch.io.decode import decode_batch\n"
      "data = open(sys.argv[1], 'rb').read()\n"
      "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
      "out = decode_batch({'key': np.array(['b'], object), 'status': np.array(['ok'], object),\n"
      "                    'error': np.array([None], object), 'image_bytes': np.array([data], object)}, 224,\n"
      "                   max_decoded_bytes=64 << 20)\n"
      "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
      "print(out['status'][0], out['width'][0], out['height'][0], out['sha256'][0] is not None)\n"
      "print(json.dumps(out['error'][0]))\n"
      "print((after - before) * 1024)\n")
  p = subprocess.run([sys.executable, "-c", script, str(tmp_path / "bomb.png")], capture_output=True, text=True,
                     timeout=120, env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent)))
  assert p.returncode == 0, p.stderr
  status, err, grown = p.stdout.splitlines()
  assert status == "error 13000 13000 True"
  err = json.loads(err)
  assert (err["stage"], err["type"]) == ("decode", "DecodeBudgetError")
  assert "decode.max_decoded_bytes" in err["message"] and "64 MiB" in err["message"] and "322 MiB" in err["message"]
  assert int(grown) < 64 << 20, f"decoding the refused bomb grew the process by {int(grown) >> 20} MiB"


def test_decode_budget_counts_after_jpeg_draft_and_by_mode():
  from pgbatch.io.decode import decoded_bytes
  big = save(Image.new("RGB", (4000, 3000), (10, 200, 30)), "JPEG")
  # 36 MB at full size, but the DCT draft decodes it at 1/8 (500 x 375 >= 224): well under 8 MiB
  pixels, w, h = decode_image(big, SIZE, max_decoded_bytes=8 << 20)
  assert (w, h) == (4000, 3000) and pixels.shape == (SIZE, SIZE, 3)
  with pytest.raises(DecodeError, match=r"decode.max_decoded_bytes") as e:
    decode_image(save(Image.new("RGBA", (1500, 1000)), "PNG"), SIZE, max_decoded_bytes=4 << 20)
  assert e.value.type_ == "DecodeBudgetError" and (e.value.width, e.value.height) == (1500, 1000)
  assert decoded_bytes(Image.new("I;16", (10, 10))) == 200 and decoded_bytes(Image.new("F", (10, 10))) == 400
  assert decoded_bytes(Image.new("RGB", (10, 10))) == 300


def test_default_decode_budget_splits_the_smallest_node_over_its_decode_tasks():
  from pgbatch import placement
  nodes = [{"Alive": True, "Resources": {"CPU": 2.0, "memory": 16 << 30}},
           {"Alive": True, "Resources": {"CPU": 16.0, "memory": 64 << 30}},
           {"Alive": False, "Resources": {"CPU": 1.0, "memory": 1 << 30}}]
  # node 1: 16 GiB * 0.5 / (2 / 0.25 tasks) / 4 = 256 MiB; node 2: 64 GiB * 0.5 / 64 / 4 = 128 MiB
  assert placement.decode_memory_budget(nodes, 0.25, 4) == 128 << 20
  assert placement.decode_memory_budget([], 0.25, 4) == placement.FALLBACK_DECODE_BUDGET
  assert placement.decode_memory_budget(nodes[:1], 0.25, 1000) == placement.MIN_DECODE_BUDGET
