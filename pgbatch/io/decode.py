"""Decode stage (CPU): image bytes -> uint8 [size, size, 3] RGB squashed to the model resolution.

- EXIF orientation is applied; width/height are the original size *after* orientation (what a viewer shows),
  so boxes relative to the squashed image map linearly onto them.
- Every PIL mode becomes RGB: 1/L/RGBX/YCbCr/LAB/HSV/CMYK by PIL's conversion; anything with alpha (LA, La, PA,
  RGBA, RGBa, P with a transparency entry) is composited onto WHITE (transparent regions read as background,
  as on a web page, rather than whatever colour the hidden pixels hold); I;16* is scaled 65535 -> 255; I and F are
  scaled by their value range (0..255 kept, 0..65535 scaled, else min-max); multi-frame files (animated GIF,
  APNG, WebP, multi-page TIFF) use their first frame.
- Squash: a plain resize to size x size (no aspect keep, no crop), bilinear with antialiasing (PIL widens the
  filter support when downscaling). Large JPEGs are first decoded at a reduced DCT scale that stays >= size.
- Decompression bombs: the pixel count from the header is checked against `max_pixels` (the one pixel limit
  messages name: decode.max_pixels) before any pixel is decoded; then the decoded size (width x height x bytes
  per pixel of the mode, after JPEG draft/DCT reduction) against `max_decoded_bytes` (decode.max_decoded_bytes):
  a 330 KB PNG can hold a 13000 x 13000 16-bit image (338 MB decoded, ~4x that while converting). Only the
  formats in FORMATS are opened (sniffed from the bytes; EPS, which would run Ghostscript on untrusted input, is
  not among them).
Failures raise DecodeError(type_, message); decode_batch turns them into error rows (stage "decode").
"""
from __future__ import annotations

import hashlib
import io
import logging
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pgbatch import rows

log = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 178_956_970  # PIL's own default bomb threshold (Image.MAX_IMAGE_PIXELS): ~13k x 13k
# Peak working memory of decoding + converting + resizing one image, per decoded byte (to_rgb keeps it low:
# 16-bit and float images are converted in integer/float32 steps and resized as one gray channel).
DECODE_PEAK_FACTOR = 4
# Formats PIL may open (sniffed from the bytes, never from the name). Deliberately not: EPS (runs Ghostscript on
# untrusted input), WMF, TGA (no magic bytes: it claims random data) and the scientific/legacy formats (FITS,
# GRIB, HDF5, SPIDER, ...) no photo pipeline needs.
FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "GIF", "TIFF", "BMP", "DIB", "ICO", "PPM", "JPEG2000", "AVIF", "QOI",
           "PSD")
ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")
SWAPPING_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that transpose (width <-> height)
EXIF_ORIENTATION = 0x0112


class DecodeError(ValueError):
  """An image that cannot be decoded. `type_` is a short machine-readable class (e.g. TruncatedImageError);
  width/height are set when the header could be read."""

  def __init__(self, type_: str, message: str, width: int = -1, height: int = -1):
    super().__init__(message)
    self.type_, self.width, self.height = type_, width, height


def _allow_pixels(max_pixels: int) -> None:
  """PIL refuses images over 2 * Image.MAX_IMAGE_PIXELS on open; raise that global (never lower it) so our
  own `max_pixels` check is the one that applies."""
  cur = Image.MAX_IMAGE_PIXELS
  if cur is not None and cur < max_pixels:
    Image.MAX_IMAGE_PIXELS = max_pixels


def decoded_bytes(im: Image.Image) -> int:
  """Bytes of `im`'s pixels once loaded, from the header: width x height x bytes per pixel of its mode."""
  from PIL import ImageMode  # pylint: disable=g-import-not-at-top
  try:
    m = ImageMode.getmode(im.mode)
    per_pixel = np.dtype(m.typestr).itemsize * len(m.bands)
  except (KeyError, TypeError, ValueError):
    per_pixel = 4
  return im.size[0] * im.size[1] * max(1, per_pixel)


def _formats() -> tuple[str, ...]:
  Image.init()
  return tuple(f for f in FORMATS if f in Image.OPEN)


def image_extensions() -> tuple[str, ...]:
  """File extensions (lowercase, no dot) PIL registers for the formats decode_image opens: exactly what a
  `format: images` listing and a WebDataset sample take as image files."""
  allowed = set(_formats())
  return tuple(sorted({e.lstrip(".").lower() for e, f in Image.registered_extensions().items() if f in allowed}))


def _magic(data: bytes) -> str:
  return data[:4].hex()


def _error_type(e: BaseException) -> str:
  """TruncatedImageError for data that ends early, else CorruptImageError."""
  text = str(e).lower()
  if isinstance(e, EOFError) or (isinstance(e, OSError) and ("truncated" in text or "end of file" in text)):
    return "TruncatedImageError"
  return "CorruptImageError"


def _orientation(im: Image.Image) -> int:
  try:
    return int(im.getexif().get(EXIF_ORIENTATION, 1) or 1)
  except Exception:  # noqa: BLE001 - a malformed EXIF block does not make the image unreadable
    return 1


def _gray_to_u8(a: np.ndarray, mode: str) -> np.ndarray:
  """Single-channel integer/float array -> uint8, see the module doc for the scaling rules. Works in uint32 or
  float32 steps (in place): a 13000 x 13000 16-bit PNG peaks at ~1.4 GiB (PIL's pixels, this array, one
  uint32 copy), where float64 temporaries took 4 GiB."""
  if mode.startswith("I;16") or (a.dtype.kind in "iu" and a.size and a.min() >= 0 and a.max() <= 65535):
    if not mode.startswith("I;16") and a.max() <= 255:
      return a.astype(np.uint8)
    out = a.astype(np.uint32)
    out += 128
    out //= 257  # round(v / 257): 65535 -> 255
    return out.astype(np.uint8)
  a = a.astype(np.float32)
  np.nan_to_num(a, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
  lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
  if mode == "F" and lo >= 0 and hi <= 1:
    a *= 255.0
  elif lo >= 0 and hi <= 255:
    pass
  elif lo >= 0 and hi <= 65535:
    a /= 257.0
  else:
    a -= lo
    a *= (255.0 / (hi - lo)) if hi > lo else 0.0
  np.rint(a, out=a)
  np.clip(a, 0, 255, out=a)
  return a.astype(np.uint8)


def _on_white(im: Image.Image) -> Image.Image:
  rgba = im.convert("RGBA")
  bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
  return Image.alpha_composite(bg, rgba).convert("RGB")


def to_rgb(im: Image.Image) -> Image.Image:
  """Any PIL mode -> RGB, or L for the integer/float gray modes (I, I;16*, F: made RGB after the resize)."""
  mode = im.mode
  if mode == "RGB":
    return im
  if mode in ALPHA_MODES or (mode == "P" and "transparency" in im.info):
    return _on_white(im)
  if mode.startswith("I") or mode == "F":
    g = _gray_to_u8(np.asarray(im), mode)
    if g.ndim != 2:
      raise DecodeError("UnsupportedModeError", f"mode {mode} gave an array of shape {g.shape}")
    return Image.fromarray(g, "L")  # gray: resized as one channel, made RGB at the model size (decode_image)
  try:
    return im.convert("RGB")
  except (ValueError, OSError) as e:
    raise DecodeError("UnsupportedModeError", f"cannot convert PIL mode {mode} to RGB: {e}") from e


def _check_budget(im: Image.Image, fmt: str, w: int, h: int, max_decoded_bytes: int | None) -> None:
  """DecodeBudgetError when the decoded pixels of `im` (after any draft reduction) exceed the budget."""
  need = decoded_bytes(im)
  if max_decoded_bytes is not None and need > max_decoded_bytes:
    raise DecodeError("DecodeBudgetError", f"{fmt} {w}x{h} {im.mode} decodes to {need / 2**20:.0f} MiB, over the "
                      f"limit of {max_decoded_bytes / 2**20:.0f} MiB (decode.max_decoded_bytes)", w, h)


def decode_image(data: bytes, size: int, max_pixels: int = DEFAULT_MAX_PIXELS,
                 max_decoded_bytes: int | None = None) -> tuple[np.ndarray, int, int]:
  """bytes -> (uint8 [size, size, 3], width, height after EXIF orientation). Raises DecodeError."""
  if data is None or len(data) == 0:
    raise DecodeError("EmptyImageError", "image is empty (0 bytes)")
  _allow_pixels(max_pixels)
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", Image.DecompressionBombWarning)
      im = Image.open(io.BytesIO(data), formats=_formats())
  except Image.DecompressionBombError as e:  # over twice PIL's limit, which is >= ours: over ours
    raise DecodeError("DecompressionBombError", f"image exceeds the limit of {max_pixels} pixels "
                      "(decode.max_pixels)") from e
  except UnidentifiedImageError as e:
    raise DecodeError("UnidentifiedImageError", f"not a recognised image format ({len(data)} bytes, first bytes "
                      f"0x{_magic(data)})") from e
  except Exception as e:  # noqa: BLE001 - PIL raises many types on corrupt headers
    raise DecodeError(_error_type(e), f"bad image header ({len(data)} bytes): {type(e).__name__}: {e}") from e
  w, h = im.size
  fmt = im.format
  if w <= 0 or h <= 0:
    raise DecodeError("CorruptImageError", f"{fmt} header declares size {w}x{h}")
  if w * h > max_pixels:
    raise DecodeError("DecompressionBombError", f"{fmt} of {w}x{h} = {w * h} pixels exceeds the limit of "
                      f"{max_pixels} pixels (decode.max_pixels)", w, h)
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", Image.DecompressionBombWarning)
      if fmt == "JPEG" and im.mode in ("RGB", "L", "CMYK"):
        im.draft(im.mode, (size, size))  # DCT-domain downscale, never below size x size
      _check_budget(im, fmt, w, h, max_decoded_bytes)
      orientation = _orientation(im)  # after the budget: PNG's getexif() decodes the whole image
      im.load()  # first frame only for multi-frame formats
      try:
        im = ImageOps.exif_transpose(im)
      except Exception as e:  # noqa: BLE001 - keep the unrotated pixels rather than losing the image
        log.warning("ignoring unusable EXIF orientation %s: %r", orientation, e)
        orientation = 1
      rgb = to_rgb(im)
      if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
      pixels = np.asarray(rgb.convert("RGB"), dtype=np.uint8)
  except DecodeError as e:
    e.width, e.height = w, h
    raise
  except Exception as e:  # noqa: BLE001 - decoder errors come in many types (SyntaxError, struct.error, ...)
    raise DecodeError(_error_type(e), f"{fmt} {w}x{h}: {type(e).__name__}: {e}", w, h) from e
  if orientation in SWAPPING_ORIENTATIONS:
    w, h = h, w
  if pixels.shape != (size, size, 3):
    raise DecodeError("UnsupportedModeError", f"decoded to shape {pixels.shape}, expected ({size}, {size}, 3)", w, h)
  return pixels, w, h


def decode_batch(batch: dict[str, np.ndarray], size: int, max_pixels: int = DEFAULT_MAX_PIXELS,
                 max_decoded_bytes: int | None = None) -> dict[str, np.ndarray]:
  """Reader columns -> the same columns plus
    pixels uint8 [B, size, size, 3] (zeros where decoding failed), width/height int32 [B] (-1 unknown),
    sha256 object [B] (hex digest of image_bytes, None when there are no bytes).
  Rows that fail get status "error" and an error struct (`rows.error`) with stage "decode"; rows already in
  error pass through."""
  n = len(batch["key"])
  pixels = np.zeros((n, size, size, 3), np.uint8)
  width = np.full((n,), -1, np.int32)
  height = np.full((n,), -1, np.int32)
  sha = np.empty((n,), object)
  status = np.array(list(batch["status"]), dtype=object)
  error = np.array(list(batch["error"]), dtype=object)
  for i, data in enumerate(batch["image_bytes"]):
    data = None if data is None else bytes(data)
    if data is not None:
      sha[i] = hashlib.sha256(data).hexdigest()
    if status[i] != "ok":
      continue
    try:
      pixels[i], width[i], height[i] = decode_image(data, size, max_pixels, max_decoded_bytes)
    except DecodeError as e:
      status[i] = "error"
      error[i] = rows.error("decode", e.type_, str(e))
      width[i], height[i] = e.width, e.height
  out = dict(batch)
  out.update(pixels=pixels, width=width, height=height, sha256=sha, status=status, error=error)
  return out
