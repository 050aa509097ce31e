"""The opened checkpoint (headers only) and its provenance; format-independent."""
from __future__ import annotations

import dataclasses
import hashlib
import math
import os
from typing import Any, Iterable, Iterator, Mapping, Optional

import numpy as np

from pgbatch.checkpoints.errors import CheckpointError, MissingKeyError, ShapeMismatchError, UnexpectedKeyError
from pgbatch.checkpoints.sources import READ_CHUNK, open_read
from pgbatch.model import configs

FORMAT_NPZ = "big_vision_npz"
FORMAT_HF = "hf_safetensors"


def _fingerprint(info: Mapping[str, Any]) -> str:
  """The best identifying field a store reports for a file without reading it: a content hash where there is one
  (GCS md5/crc32c, HF LFS sha256 or git blob id), else an etag, generation or modification time."""
  lfs = info.get("lfs")
  if isinstance(lfs, Mapping) and lfs.get("sha256"):
    return f"sha256={lfs['sha256']}"
  for k in ("md5Hash", "crc32c", "md5", "blob_id", "ETag", "etag", "generation", "mtime", "LastModified",
            "last_modified", "updated"):
    if info.get(k) is not None:
      return f"{k}={info[k]}"
  return ""


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
  """Where a checkpoint came from. `digest` is cheap: sha256 over (name, size, etag|mtime) of every file."""
  uri: str
  format: str
  digest: str
  files: tuple[tuple[str, int], ...]  # (path, size) in logical order
  fs: Any = dataclasses.field(default=None, repr=False, compare=False)

  def as_dict(self) -> dict[str, str]:
    """For an output's provenance column."""
    return dict(uri=self.uri, format=self.format, digest=self.digest)

  def full_sha256(self) -> str:
    """sha256 of the content. npz (also when split into parts): of the logical file. HF dir: of
    "name sha256(file)\\n" lines in name order."""
    if self.format == FORMAT_NPZ:
      h = hashlib.sha256()
      for path, _ in self.files:
        hash_file(self.fs, path, h)
      return h.hexdigest()
    lines = []
    for path, _ in sorted(self.files):
      lines.append(f"{os.path.basename(path)} {hash_file(self.fs, path, hashlib.sha256()).hexdigest()}\n")
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def hash_file(fs, path, h):
  with open_read(fs, path, READ_CHUNK) as f:
    while chunk := f.read(READ_CHUNK):
      h.update(chunk)
  return h


def make_info(uri, fmt, fs, infos: list[dict]) -> CheckpointInfo:
  h = hashlib.sha256()
  for i in infos:
    h.update(f"{os.path.basename(i['name'])}\0{i['size']}\0{_fingerprint(i)}\n".encode())
  return CheckpointInfo(uri, fmt, h.hexdigest(), tuple((i["name"], int(i["size"])) for i in infos), fs)


class Checkpoint:
  """An opened checkpoint (headers only). Construct with `open_checkpoint`; close when done (or use `with`)."""

  def __init__(self, info: CheckpointInfo, config: configs.PaliGemmaConfig, shapes, reader, sources=None,
               missing=None, closer=None):
    self.info, self.config = info, config
    self._shapes, self._reader, self._closer = shapes, reader, closer
    self._sources = sources or {}   # name → where it comes from ("HF x in model.safetensors")
    self._missing = missing or {}   # big_vision name → description of the HF tensors not found

  def __repr__(self):
    return f"Checkpoint({self.info.uri!r}, format={self.info.format}, config={self.config.name})"

  def __enter__(self):
    return self

  def __exit__(self, *_):
    self.close()

  def names_and_shapes(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Flat big_vision name → (shape, stored dtype); no tensor data is read. Keys not mappable to big_vision
    names (HF only) appear under their HF name with their HF shape."""
    return dict(self._shapes)

  @property
  def nbytes(self) -> int:
    """Bytes of all tensors as stored."""
    return sum(math.prod(s) * d.itemsize for s, d in self._shapes.values())

  def check(self, cfg: Optional[configs.PaliGemmaConfig] = None) -> None:
    """Raises MissingKeyError / UnexpectedKeyError / ShapeMismatchError unless names and shapes are exactly
    `configs.param_shapes(cfg)` (default: self.config). Reads no tensor data."""
    cfg = cfg or self.config
    want, have = configs.param_shapes(cfg), {k: s for k, (s, _) in self._shapes.items()}
    where = f"checkpoint {self.info.uri} (as {cfg.name})"
    more = lambda xs: "; …" if len(xs) > 10 else ""
    missing = [k for k in want if k not in have]
    if missing:
      raise MissingKeyError(f"{where} is missing {len(missing)} key(s): " + "; ".join(
          f"{k} (expected shape {want[k]}{self._why_missing(k)})" for k in missing[:10]) + more(missing))
    extra = [k for k in have if k not in want]
    if extra:
      raise UnexpectedKeyError(f"{where} has {len(extra)} unexpected key(s): " + "; ".join(
          f"{k} (shape {have[k]}{self._source(k)})" for k in extra[:10]) + more(extra))
    bad = [k for k in want if tuple(have[k]) != tuple(want[k])]
    if bad:
      raise ShapeMismatchError(f"{where} has {len(bad)} shape mismatch(es): " + "; ".join(
          f"{k}: expected {want[k]}, found {tuple(have[k])}{self._source(k)}" for k in bad[:10]) + more(bad))

  def _source(self, name):
    return f", {self._sources[name]}" if name in self._sources else ""

  def _why_missing(self, name):
    return f"; {self._missing[name]}" if name in self._missing else ""

  def tensors(self, names: Optional[Iterable[str]] = None, dtype=None) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (big_vision name, numpy array) one tensor at a time, in file order, cast to `dtype` while reading
    (default: as stored). Each array is freshly allocated and not kept: host memory holds about one tensor."""
    keep = None if names is None else set(names)
    dtype = None if dtype is None else np.dtype(dtype)
    for name in self._shapes:
      if keep is None or name in keep:
        try:
          array = self._reader(name, dtype)
        except CheckpointError:
          raise
        except (OSError, EOFError, ValueError) as e:
          raise CheckpointError(f"checkpoint {self.info.uri}: reading {name}{self._source(name)} failed: "
                                f"{type(e).__name__}: {e}") from None
        yield name, array
        del array

  def close(self):
    if self._closer is not None:
      self._closer()
      self._closer = None

  def __del__(self):
    try:
      self.close()
    except Exception:  # pylint: disable=broad-except  (best effort at garbage collection)
      pass

