"""big_vision `.npz` (a zip of `.npy` members, ZIP_STORED by np.savez), also split into `.npz.partNN` files:
read one member at a time straight into its final buffer (CRC checked); written as a stream (bf16 as |V2)."""
from __future__ import annotations

import io
import math
import os
import re
import struct
import zipfile
import zlib
from typing import Iterable, Mapping, Optional

import fsspec
import ml_dtypes
import numpy as np

from pgbatch.checkpoints.architecture import config_from_shapes
from pgbatch.checkpoints.checkpoint import FORMAT_NPZ, Checkpoint, make_info
from pgbatch.checkpoints.errors import CheckpointNotFoundError, UnknownFormatError, corrupt
from pgbatch.checkpoints.sources import ByteSource, PartsReader, StreamOut, glob_escape, open_read, read_cast
from pgbatch.fsutil import is_local
from pgbatch.model import configs

BF16 = np.dtype(ml_dtypes.bfloat16)
_NPZ_DATE = (1980, 1, 1, 0, 0, 0)  # fixed zip timestamps: identical params give identical files


def _bv_name(member: str) -> str:
  name = member[:-4] if member.endswith(".npy") else member
  return name.removeprefix("params/")


def _recover_dtype(dtype: np.dtype) -> np.dtype:
  """big_vision stores bf16 as numpy void |V2 (utils.recover_dtype)."""
  return BF16 if dtype == np.dtype("V2") else dtype


def _npy_header(f, uri, member) -> tuple[tuple[int, ...], bool, np.dtype, bytes]:
  """Reads an .npy header at the current position → (shape, fortran_order, dtype, raw header bytes)."""
  magic = f.read(8)
  if len(magic) < 8 or magic[:6] != b"\x93NUMPY":
    raise corrupt(uri, f"member {member} is not a .npy array")
  major = magic[6]
  size_fmt = "<H" if major == 1 else "<I"
  raw_len = f.read(struct.calcsize(size_fmt))
  hlen, = struct.unpack(size_fmt, raw_len)
  header = f.read(hlen)
  if len(header) < hlen:
    raise corrupt(uri, f"member {member}: .npy header cut short")
  raw = magic + raw_len + header
  try:
    reader = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = reader(io.BytesIO(raw[8:]), max_header_size=1 << 20)
  except (ValueError, SyntaxError) as e:
    raise corrupt(uri, f"member {member}: bad .npy header ({e})") from None
  if dtype.hasobject:
    raise corrupt(uri, f"member {member}: object arrays are not allowed")
  return tuple(shape), fortran, dtype, raw


class _Npz:
  """A (possibly split) big_vision .npz; reads one member at a time straight into its final buffer."""

  def __init__(self, uri, fs, paths: list[str], infos: list[dict]):
    self.uri, self.fs, self.paths = uri, fs, paths
    sizes = [int(i["size"]) for i in infos]
    if len(paths) == 1:
      self.f = open_read(fs, paths[0])
    else:
      self.f = io.BufferedReader(PartsReader(fs, paths, sizes), buffer_size=1 << 16)
    try:
      self.zip = zipfile.ZipFile(self.f)
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
      self.f.close()
      raise corrupt(uri, f"no zip directory at the end of the file, it is probably truncated ({e}; "
                     f"{sum(sizes)} bytes in {len(paths)} file(s))") from None
    self.members = {_bv_name(z.filename): z for z in self.zip.infolist() if not z.is_dir()}
    self._headers = {}
    self.data = ByteSource(uri, fs, paths, sizes)

  def _data_start(self, z: zipfile.ZipInfo) -> int:
    self.f.seek(z.header_offset)
    local = self.f.read(30)
    if len(local) < 30 or local[:4] != b"PK\x03\x04":
      raise corrupt(self.uri, f"bad local zip header for member {z.filename}")
    n, m = struct.unpack("<HH", local[26:30])
    return z.header_offset + 30 + n + m

  def header(self, name):
    """→ (shape, fortran_order, stored dtype, raw header bytes, data offset) of one member, reading only its header."""
    if name not in self._headers:
      z = self.members[name]
      if z.compress_type != zipfile.ZIP_STORED:
        with self.zip.open(z) as m:
          shape, fortran, dtype, raw = _npy_header(m, self.uri, z.filename)
        self._headers[name] = (shape, fortran, dtype, raw, None)
      else:
        start = self._data_start(z)
        self.f.seek(start)
        shape, fortran, dtype, raw = _npy_header(self.f, self.uri, z.filename)
        nbytes = math.prod(shape) * dtype.itemsize
        if len(raw) + nbytes != z.file_size:
          raise corrupt(self.uri, f"member {z.filename}: header says {shape} {dtype} ({nbytes} bytes) "
                         f"but the member holds {z.file_size - len(raw)} bytes")
        self._headers[name] = (shape, fortran, dtype, raw, start + len(raw))
    return self._headers[name]

  def names_and_shapes(self):
    out = {}
    for name in self.members:
      shape, _, dtype, *_ = self.header(name)
      out[name] = (shape, _recover_dtype(dtype))
    return out

  def read(self, name, dtype: Optional[np.dtype] = None) -> np.ndarray:
    """Member `name` as an array of `dtype` (default: the stored dtype), cast while reading; CRC checked."""
    z = self.members[name]
    shape, fortran, stored, raw, offset = self.header(name)
    if offset is None:  # compressed member (np.savez_compressed): let zipfile inflate and check the CRC.
      try:
        with self.zip.open(z) as m:
          arr = np.lib.format.read_array(m, allow_pickle=False)
      except (zipfile.BadZipFile, EOFError, ValueError, zlib.error) as e:
        raise corrupt(self.uri, f"member {z.filename}: {e}") from None
      arr = arr.view(BF16) if arr.dtype == np.dtype("V2") else arr
      return arr if dtype is None else arr.astype(dtype)
    stored = _recover_dtype(stored)
    arr, crc = read_cast(self.data, offset, shape[::-1] if fortran else shape, stored, dtype,
                          f"member {z.filename}", zlib.crc32(raw))
    if crc != z.CRC:
      raise corrupt(self.uri, f"CRC mismatch in member {z.filename}")
    return arr.T if fortran else arr

  def close(self):
    self.zip.close()
    self.f.close()
    self.data.close()


NPZ_NAME = re.compile(r".*\.npz(\.part\d+)?$")


def open_npz(uri, fs, path, info, variant=None) -> Checkpoint:
  base = re.sub(r"\.part\d+$", "", path)
  if info is None or base != path:
    parts = sorted(fs.glob(glob_escape(base) + ".part*"))
    parts = [p for p in parts if re.fullmatch(r".*\.part\d+", p)]
    if not parts:
      raise CheckpointNotFoundError(f"checkpoint not found: {uri}" + (
          "" if NPZ_NAME.match(path) else " (expected a big_vision .npz file, split .npz.partNN files, or a "
          "Hugging Face directory)"))
    nums = [int(re.search(r"\.part(\d+)$", p).group(1)) for p in parts]
    order = sorted(range(len(parts)), key=lambda i: nums[i])
    parts, nums = [parts[i] for i in order], [nums[i] for i in order]
    if nums != list(range(nums[0], nums[0] + len(nums))) or nums[0] not in (0, 1):
      gaps = sorted(set(range(nums[0], nums[-1] + 1)) - set(nums)) if nums[0] in (0, 1) else [0]
      raise corrupt(uri, f"split parts are not consecutive: found part numbers {nums}, missing {gaps}")
    infos = [fs.info(p) for p in parts]
  else:
    parts, infos = [path], [info]
    with open_read(fs, path) as f:
      magic = f.read(4)
    if magic != b"PK\x03\x04":
      if magic[:2] == b"PK" or NPZ_NAME.match(path):
        raise corrupt(uri, f"not a zip/npz file (first bytes {magic!r})")
      raise UnknownFormatError(f"cannot tell the format of {uri}: expected a big_vision .npz, split .npz.partNN "
                               f"files, or a Hugging Face directory with config.json and model.safetensors "
                               f"(first bytes {magic!r})")
  npz = _Npz(uri, fs, parts, infos)
  try:
    shapes = npz.names_and_shapes()
    if variant in configs.VARIANTS:  # checked against the shapes by the caller; nothing to infer
      cfg = configs.VARIANTS[variant]
    else:
      cfg = config_from_shapes({k: s for k, (s, _) in shapes.items()}, uri)
  except BaseException:
    npz.close()
    raise
  return Checkpoint(make_info(uri, FORMAT_NPZ, fs, infos), cfg, shapes, npz.read, closer=npz.close)


def write_npz_stream(items: Iterable[tuple[str, np.ndarray]], uri: str) -> None:
  """Writes (name, array) pairs arriving one at a time as a big_vision .npz at any fsspec URL (bf16 as |V2)."""
  fs, path = fsspec.core.url_to_fs(uri)
  fs.makedirs(os.path.dirname(path) or ".", exist_ok=True) if is_local(fs) else None
  with fs.open(path, "wb") as raw:
    with zipfile.ZipFile(raw if is_local(fs) else StreamOut(raw), "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
      for name, arr in items:
        arr = np.asarray(arr)
        if arr.dtype == BF16:
          arr = arr.view("V2")
        zi = zipfile.ZipInfo(f"{name}.npy", date_time=_NPZ_DATE)
        with zf.open(zi, "w", force_zip64=True) as m:
          np.lib.format.write_array(m, np.ascontiguousarray(arr), allow_pickle=False)


def write_npz(flat_params: Mapping[str, np.ndarray], uri: str) -> None:
  """Writes a big_vision .npz (flat `/` names, bf16 stored as |V2 like big_vision) to any fsspec URL."""
  write_npz_stream(sorted(flat_params.items()), uri)

