"""The robustness set: awkward and broken image inputs, each with the outcome the pipeline must give.

    from tests.bad_images import bad_samples, write_webdataset, EXPECTED_ERROR_TYPES, EXPECTED_SIZES
    samples = bad_samples()                     # [(key, bytes, "ok" | "error"), ...]
    write_webdataset("/tmp/bad.tar", samples)   # one WebDataset tar: <key>.jpg (or .png/.gif) + <key>.json

Everything is generated in memory with PIL/numpy (deterministic, < 1 s).
"""
from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib

import numpy as np
from PIL import Image

# key -> DecodeError.type_ (stage "decode") for the samples that must fail
EXPECTED_ERROR_TYPES = {
    "truncated_jpeg": "TruncatedImageError",
    "zero_bytes": "EmptyImageError",
    "text_as_jpg": "UnidentifiedImageError",
    "bomb_png_header": "DecompressionBombError",
}
# key -> (width, height) after EXIF orientation, for the samples that must decode
EXPECTED_SIZES = {
    "cmyk_jpeg": (64, 48),
    "png_16bit": (40, 30),
    "palette_transparent": (32, 32),
    "exif_rotated": (30, 80),      # stored 80x30 with orientation 6 (rotate 90 CW): shown 30 wide, 80 high
    "one_by_one": (1, 1),
    "one_by_5000": (1, 5000),
    "animated_gif": (24, 24),
    "rgba_png": (20, 10),
    "la_png": (12, 12),
    "grayscale_jpeg": (33, 17),
}
# file extension used for each sample in the tar (default jpg)
EXTENSIONS = {"bomb_png_header": "png", "png_16bit": "png", "palette_transparent": "png", "one_by_5000": "png",
              "animated_gif": "gif", "rgba_png": "png", "la_png": "png", "one_by_one": "png"}


def _save(im: Image.Image, fmt: str, **kw) -> bytes:
  buf = io.BytesIO()
  im.save(buf, fmt, **kw)
  return buf.getvalue()


def _gradient(w: int, h: int) -> np.ndarray:
  """uint8 [h, w, 3], smooth so that JPEG keeps it recognisable."""
  y, x = np.mgrid[0:h, 0:w]
  return np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), np.full_like(x, 128)], -1).astype(np.uint8)


def _png_chunk(kind: bytes, body: bytes) -> bytes:
  return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
  """A ~100-byte PNG whose IHDR declares width x height 8-bit grayscale (10^10 pixels by default)."""
  ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
  idat = zlib.compress(b"\0" * 1024)
  return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def exif_rotated_jpeg() -> bytes:
  """80x30 stored pixels (left half red, right half blue), EXIF orientation 6: displays 30x80 with red on top."""
  a = np.zeros((30, 80, 3), np.uint8)
  a[:, :40] = (255, 0, 0)
  a[:, 40:] = (0, 0, 255)
  exif = Image.Exif()
  exif[0x0112] = 6
  return _save(Image.fromarray(a), "JPEG", quality=95, exif=exif.tobytes())


def animated_gif() -> bytes:
  """Three 24x24 frames: red, green, blue. The first (red) one must be used."""
  frames = [Image.new("RGB", (24, 24), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
  return _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def palette_transparent_png() -> bytes:
  """32x32 palette image: left half index 0 (transparent, colour black), right half index 1 (opaque green)."""
  im = Image.new("P", (32, 32), 0)
  im.putpalette([0, 0, 0, 0, 200, 0] + [0] * (256 * 3 - 6))
  im.paste(1, (16, 0, 32, 32))
  return _save(im, "PNG", transparency=0)


def png_16bit() -> bytes:
  """40x30 16-bit grayscale (mode I;16) ramp 0..65535 along x."""
  a = (np.linspace(0, 65535, 40).round().astype(np.uint16)[None, :].repeat(30, 0))
  return _save(Image.fromarray(a), "PNG")


def bad_samples() -> list[tuple[str, bytes, str]]:
  """[(key, image bytes, expected status)] for the robustness test; keys are unique and sorted."""
  noisy = np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8)
  good_jpeg = _save(Image.fromarray(noisy), "JPEG", quality=90)  # header ~600 B of ~30 kB: cut inside the scan
  rgba = np.zeros((10, 20, 4), np.uint8)
  rgba[..., 0] = 255
  rgba[:, 10:, 3] = 255  # left half fully transparent red, right half opaque red
  la = np.zeros((12, 12, 2), np.uint8)
  la[..., 0] = 100
  la[:, :6, 1] = 255  # left half opaque gray 100, right half transparent
  samples = [
      ("animated_gif", animated_gif(), "ok"),
      ("bomb_png_header", bomb_png(), "error"),
      ("cmyk_jpeg", _save(Image.fromarray(_gradient(64, 48)).convert("CMYK"), "JPEG", quality=90), "ok"),
      ("exif_rotated", exif_rotated_jpeg(), "ok"),
      ("grayscale_jpeg", _save(Image.fromarray(_gradient(33, 17)[..., 0], "L"), "JPEG"), "ok"),
      ("la_png", _save(Image.fromarray(la, "LA"), "PNG"), "ok"),
      ("one_by_5000", _save(Image.fromarray(_gradient(1, 5000)), "PNG"), "ok"),
      ("one_by_one", _save(Image.new("RGB", (1, 1), (10, 20, 30)), "PNG"), "ok"),
      ("palette_transparent", palette_transparent_png(), "ok"),
      ("png_16bit", png_16bit(), "ok"),
      ("rgba_png", _save(Image.fromarray(rgba, "RGBA"), "PNG"), "ok"),
      ("text_as_jpg", b"this is not an image, just text named .jpg\n" * 4, "error"),
      ("truncated_jpeg", good_jpeg[:len(good_jpeg) // 2], "error"),
      ("zero_bytes", b"", "error"),
  ]
  assert [k for k, _, _ in samples] == sorted(k for k, _, _ in samples)
  return samples


def write_webdataset(path: str, samples: list[tuple[str, bytes, str]], fs=None) -> str:
  """Writes samples as one WebDataset tar: "<key>.<ext>" (ext from EXTENSIONS, default jpg) followed by
  "<key>.json" = {"key": key, "expected": status}. `path` may be any fsspec URL (or a path of `fs`)."""
  import fsspec  # pylint: disable=g-import-not-at-top
  buf = io.BytesIO()
  with tarfile.open(fileobj=buf, mode="w") as tar:
    for key, data, status in samples:
      for name, body in ((f"{key}.{EXTENSIONS.get(key, 'jpg')}", data),
                         (f"{key}.json", json.dumps({"key": key, "expected": status}).encode())):
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(body), 0, 0o644
        tar.addfile(info, io.BytesIO(body))
  if fs is not None:
    fs.pipe(path, buf.getvalue())
  else:
    with fsspec.open(path, "wb") as f:
      f.write(buf.getvalue())
  return path
