"""Decode stage: the robustness set, every PIL mode, EXIF orientation, bomb limit, decode_batch contract."""
from __future__ import annotations

import hashlib
import io
import json

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
  read_err = json.dumps({"stage": "read", "type": "NoImageMember", "message": "m"})
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
      e = json.loads(out["error"][i])
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
  assert all(r["shard_rows"] == len(samples) for r in rows)
  cols = {k: np.array([r[k] for r in rows], dtype=object) for k in rows[0]}
  out = decode_batch(cols, SIZE)
  got = {k: (s, json.loads(e)["type"] if e else None) for k, s, e in zip(out["key"], out["status"], out["error"])}
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
