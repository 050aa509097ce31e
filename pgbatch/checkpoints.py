"""PaliGemma checkpoints: big_vision `.npz` and Hugging Face safetensors, from any fsspec URL, one tensor at a time.

    ck = open_checkpoint("gs://bucket/pt_224.bf16.npz")     # or a HF directory, or split `x.npz.part00, …`
    ck.check(ck.config)                                     # names and shapes, before any tensor data is read
    for name, array in ck.tensors():                        # flat big_vision names, numpy, stored dtype
      ...

Every format is presented in big_vision layout: the flat `/`-joined names of `configs.param_shapes`, layers stacked on
a leading depth axis, 257152 vocabulary rows. Hugging Face tensors are transposed/reshaped on the fly (spec §7).
Peak host memory is about one (stacked) tensor: nothing is concatenated on disk or downloaded whole.

Letters: L depth, N heads, K kv heads, H head_dim, D width, F mlp_dim, W vision width, P patches, V vocab.
"""
from __future__ import annotations

import bisect
import dataclasses
import hashlib
import io
import json
import math
import os
import re
import struct
import sys
import time
import zipfile
import zlib
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional

import fsspec
import ml_dtypes
import numpy as np

from pgbatch.model import configs

BF16 = np.dtype(ml_dtypes.bfloat16)
FORMAT_NPZ = "big_vision_npz"
FORMAT_HF = "hf_safetensors"
_READ_CHUNK = 16 << 20     # bytes per local read: the fixed host-memory overhead of streaming (plus one fsspec block)
_REMOTE_REQUEST = 16 << 20  # bytes per ranged request on object stores
_REMOTE_CONCURRENCY = int(os.environ.get("PGBATCH_CKPT_CONCURRENCY", "4"))  # ranged requests in flight (64 MiB)
_BLOCK_SIZE = 1 << 20      # fsspec read-ahead block: small, so header reads do not pull whole blocks of tensors
_NPZ_DATE = (1980, 1, 1, 0, 0, 0)  # fixed zip timestamps: identical params give identical files


# ---------------------------------------------------------------------------------------------------------------
# Errors.


class CheckpointError(Exception):
  """Base class: anything wrong with a checkpoint, with a message that names the URI or key."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
  pass


class UnknownFormatError(CheckpointError):
  pass


class CorruptCheckpointError(CheckpointError):
  """Truncated or damaged file (bad zip, bad npy/safetensors header, short read, CRC mismatch)."""


class MissingKeyError(CheckpointError):
  pass


class UnexpectedKeyError(CheckpointError):
  pass


class ShapeMismatchError(CheckpointError):
  pass


def _corrupt(uri: str, reason: str) -> CorruptCheckpointError:
  return CorruptCheckpointError(f"checkpoint {uri} is corrupt or truncated: {reason}")


# ---------------------------------------------------------------------------------------------------------------
# Provenance.


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
        _hash_file(self.fs, path, h)
      return h.hexdigest()
    lines = []
    for path, _ in sorted(self.files):
      lines.append(f"{os.path.basename(path)} {_hash_file(self.fs, path, hashlib.sha256()).hexdigest()}\n")
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def _hash_file(fs, path, h):
  with _open_read(fs, path, _READ_CHUNK) as f:
    while chunk := f.read(_READ_CHUNK):
      h.update(chunk)
  return h


def _make_info(uri, fmt, fs, infos: list[dict]) -> CheckpointInfo:
  h = hashlib.sha256()
  for i in infos:
    h.update(f"{os.path.basename(i['name'])}\0{i['size']}\0{_fingerprint(i)}\n".encode())
  return CheckpointInfo(uri, fmt, h.hexdigest(), tuple((i["name"], int(i["size"])) for i in infos), fs)


# ---------------------------------------------------------------------------------------------------------------
# Byte-level readers.


def _open_read(fs, path: str, block_size: int = _BLOCK_SIZE):
  """Opens for header reads at scattered offsets: a plain read-ahead block cache (small reads are served from one
  block; tensor data goes through _ByteSource). gcsfs' default adaptive prefetcher is not used: it assumes one
  forward scan and stalled for seconds on every seek (HF loads from gs:// took 70x longer)."""
  if _is_local(fs):
    return fs.open(path, "rb")
  try:
    return fs.open(path, "rb", block_size=block_size, cache_type="readahead")
  except TypeError:  # a filesystem without cache options
    return fs.open(path, "rb")


def _readinto_full(f, out: memoryview, uri: str, what: str) -> None:
  """Fills `out` from file `f` (any file-like with readinto) or raises CorruptCheckpointError on a short read."""
  n = 0
  while n < len(out):
    got = f.readinto(out[n:n + _READ_CHUNK])
    if not got:
      raise _corrupt(uri, f"{what}: expected {len(out)} bytes, file ended after {n}")
    n += got


class _ByteSource:
  """Bulk reads from one logical file (one object, or split parts read as one): `readinto(offset, out)`.

  Local files are read sequentially. On object stores each read goes out as windows of concurrent ranged
  requests (`fs.cat_ranges`: _REMOTE_CONCURRENCY requests of _REMOTE_REQUEST bytes), which is what makes
  gs:// / s3:// loads fast; memory stays bounded by one window.
  """

  def __init__(self, uri: str, fs, paths: list[str], sizes: list[int]):
    self.uri, self.fs, self.paths = uri, fs, paths
    self.starts = [0]
    for size in sizes:
      self.starts.append(self.starts[-1] + size)
    self.local = _is_local(fs)
    self.window = _READ_CHUNK if self.local else _REMOTE_REQUEST * _REMOTE_CONCURRENCY
    self._f = None

  def readinto(self, offset: int, out: memoryview, what: str) -> None:
    """Fills `out` with the bytes at [offset, offset + len(out)) or raises CorruptCheckpointError."""
    if offset + len(out) > self.starts[-1]:
      raise _corrupt(self.uri, f"{what}: needs bytes up to {offset + len(out)}, the file has {self.starts[-1]}")
    if self.local:
      if self._f is None:
        self._f = (_open_read(self.fs, self.paths[0]) if len(self.paths) == 1 else
                   io.BufferedReader(_PartsReader(self.fs, self.paths, np.diff(self.starts).tolist())))
      self._f.seek(offset)
      _readinto_full(self._f, out, self.uri, what)
      return
    pieces, pos = [], 0  # (path, start, end, position in out); never across a part boundary
    while pos < len(out):
      at = offset + pos
      i = bisect.bisect_right(self.starts, at) - 1
      n = min(_REMOTE_REQUEST, len(out) - pos, self.starts[i + 1] - at)
      pieces.append((self.paths[i], at - self.starts[i], at - self.starts[i] + n, pos))
      pos += n
    for w in range(0, len(pieces), _REMOTE_CONCURRENCY):
      batch = pieces[w:w + _REMOTE_CONCURRENCY]
      datas = self.fs.cat_ranges([p[0] for p in batch], [p[1] for p in batch], [p[2] for p in batch])
      for (path, start, end, at), data in zip(batch, datas):
        if isinstance(data, BaseException):
          raise data
        if len(data) != end - start:
          raise _corrupt(self.uri, f"{what}: {os.path.basename(path)} returned {len(data)} of bytes "
                         f"{start}-{end}")
        out[at:at + len(data)] = data
      del datas

  def close(self):
    if self._f is not None:
      self._f.close()
      self._f = None


def _read_cast(src: _ByteSource, offset: int, shape: tuple[int, ...], stored: np.dtype, dtype: Optional[np.dtype],
               what: str, crc: Optional[int] = None) -> tuple[np.ndarray, Optional[int]]:
  """Reads a row-major array of `stored` dtype at `offset` of `src` into a new array of `dtype` (default: stored),
  casting chunk by chunk, so host memory holds the result plus one chunk. Returns (array, zlib.crc32 continued
  from `crc` over the raw bytes, or None when `crc` is None)."""
  dtype = stored if dtype is None else np.dtype(dtype)
  out = np.empty(shape, dtype)
  flat = out.reshape(-1)
  if dtype == stored:  # straight into the result
    buf = memoryview(flat.view(np.uint8)) if flat.size else memoryview(b"")
    src.readinto(offset, buf, what)
    return out, (None if crc is None else zlib.crc32(buf, crc))
  per = max(1, src.window // stored.itemsize)
  stage = np.empty(min(per, flat.size), stored)
  for i in range(0, flat.size, per):
    n = min(per, flat.size - i)
    buf = memoryview(stage[:n].view(np.uint8))
    src.readinto(offset + i * stored.itemsize, buf, what)
    if crc is not None:
      crc = zlib.crc32(buf, crc)
    flat[i:i + n] = stage[:n]
  return out, crc


class _PartsReader(io.RawIOBase):
  """Read-only, seekable view of several files as one (split `x.npz.part00, part01, …`); nothing is copied."""

  def __init__(self, fs, paths: list[str], sizes: list[int]):
    super().__init__()
    self._fs, self._paths = fs, paths
    self._starts = [0]
    for s in sizes:
      self._starts.append(self._starts[-1] + s)
    self._pos = 0
    self._files = {}

  def readable(self):
    return True

  def seekable(self):
    return True

  def tell(self):
    return self._pos

  def seek(self, offset, whence=io.SEEK_SET):
    base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._starts[-1]}[whence]
    self._pos = max(0, base + offset)
    return self._pos

  def _part(self, i):
    if i not in self._files:
      self._files[i] = _open_read(self._fs, self._paths[i])
    return self._files[i]

  def readinto(self, b):
    out = memoryview(b).cast("B")
    n = 0
    while n < len(out) and self._pos < self._starts[-1]:
      i = bisect.bisect_right(self._starts, self._pos) - 1
      f = self._part(i)
      f.seek(self._pos - self._starts[i])
      want = min(len(out) - n, self._starts[i + 1] - self._pos)
      got = f.readinto(out[n:n + want])
      if not got:
        break
      n += got
      self._pos += got
    return n

  def close(self):
    for f in self._files.values():
      f.close()
    self._files = {}
    super().close()


# ---------------------------------------------------------------------------------------------------------------
# big_vision .npz (a zip of .npy members, ZIP_STORED by np.savez).


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
    raise _corrupt(uri, f"member {member} is not a .npy array")
  major = magic[6]
  size_fmt = "<H" if major == 1 else "<I"
  raw_len = f.read(struct.calcsize(size_fmt))
  hlen, = struct.unpack(size_fmt, raw_len)
  header = f.read(hlen)
  if len(header) < hlen:
    raise _corrupt(uri, f"member {member}: .npy header cut short")
  raw = magic + raw_len + header
  try:
    reader = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = reader(io.BytesIO(raw[8:]), max_header_size=1 << 20)
  except (ValueError, SyntaxError) as e:
    raise _corrupt(uri, f"member {member}: bad .npy header ({e})") from None
  if dtype.hasobject:
    raise _corrupt(uri, f"member {member}: object arrays are not allowed")
  return tuple(shape), fortran, dtype, raw


class _Npz:
  """A (possibly split) big_vision .npz; reads one member at a time straight into its final buffer."""

  def __init__(self, uri, fs, paths: list[str], infos: list[dict]):
    self.uri, self.fs, self.paths = uri, fs, paths
    sizes = [int(i["size"]) for i in infos]
    if len(paths) == 1:
      self.f = _open_read(fs, paths[0])
    else:
      self.f = io.BufferedReader(_PartsReader(fs, paths, sizes), buffer_size=1 << 16)
    try:
      self.zip = zipfile.ZipFile(self.f)
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
      self.f.close()
      raise _corrupt(uri, f"no zip directory at the end of the file, it is probably truncated ({e}; "
                     f"{sum(sizes)} bytes in {len(paths)} file(s))") from None
    self.members = {_bv_name(z.filename): z for z in self.zip.infolist() if not z.is_dir()}
    self._headers = {}
    self.data = _ByteSource(uri, fs, paths, sizes)

  def _data_start(self, z: zipfile.ZipInfo) -> int:
    self.f.seek(z.header_offset)
    local = self.f.read(30)
    if len(local) < 30 or local[:4] != b"PK\x03\x04":
      raise _corrupt(self.uri, f"bad local zip header for member {z.filename}")
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
          raise _corrupt(self.uri, f"member {z.filename}: header says {shape} {dtype} ({nbytes} bytes) "
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
        raise _corrupt(self.uri, f"member {z.filename}: {e}") from None
      arr = arr.view(BF16) if arr.dtype == np.dtype("V2") else arr
      return arr if dtype is None else arr.astype(dtype)
    stored = _recover_dtype(stored)
    arr, crc = _read_cast(self.data, offset, shape[::-1] if fortran else shape, stored, dtype,
                          f"member {z.filename}", zlib.crc32(raw))
    if crc != z.CRC:
      raise _corrupt(self.uri, f"CRC mismatch in member {z.filename}")
    return arr.T if fortran else arr

  def close(self):
    self.zip.close()
    self.f.close()
    self.data.close()


class _StreamOut:
  """Write-only, unseekable wrapper: zipfile then writes data descriptors instead of seeking back."""

  def __init__(self, f):
    self._f = f

  def write(self, b):
    return self._f.write(b)

  def flush(self):
    pass

  def tell(self):
    raise OSError("unseekable")

  def seek(self, *_):
    raise OSError("unseekable")


def _is_local(fs) -> bool:
  return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def write_npz_stream(items: Iterable[tuple[str, np.ndarray]], uri: str) -> None:
  """Writes (name, array) pairs arriving one at a time as a big_vision .npz at any fsspec URL (bf16 as |V2)."""
  fs, path = fsspec.core.url_to_fs(uri)
  fs.makedirs(os.path.dirname(path) or ".", exist_ok=True) if _is_local(fs) else None
  with fs.open(path, "wb") as raw:
    with zipfile.ZipFile(raw if _is_local(fs) else _StreamOut(raw), "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
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


# ---------------------------------------------------------------------------------------------------------------
# safetensors (header: u64 little-endian length + JSON; then raw row-major tensors).

_ST_DTYPES = {"F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": BF16,
              "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
              "U8": np.dtype("u1"), "BOOL": np.dtype("?")}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


class _Safetensors:
  """One safetensors file: header parsed eagerly and checked against the file size; tensors read on demand."""

  def __init__(self, uri, fs, path, size):
    self.uri, self.fs, self.path, self.size = uri, fs, path, size
    with _open_read(fs, path) as f:
      head = f.read(8)
      if len(head) < 8:
        raise _corrupt(uri, f"{os.path.basename(path)} is shorter than a safetensors header")
      n, = struct.unpack("<Q", head)
      if n > min(size - 8, 100 << 20):
        raise _corrupt(uri, f"{os.path.basename(path)}: safetensors header length {n} exceeds the file")
      try:
        header = json.loads(f.read(n))
        self.entries = {k: (_ST_DTYPES[v["dtype"]], tuple(v["shape"]), *v["data_offsets"])
                        for k, v in header.items() if k != "__metadata__"}
      except (ValueError, KeyError, TypeError) as e:
        raise _corrupt(uri, f"{os.path.basename(path)}: bad safetensors header ({e!r})") from None
    self.data_start = 8 + n
    end = max((e[3] for e in self.entries.values()), default=0)
    if self.data_start + end > size:
      raise _corrupt(uri, f"{os.path.basename(path)} is truncated: header declares {self.data_start + end} bytes, "
                     f"file has {size}")
    for k, (dtype, shape, b, e) in self.entries.items():
      if e - b != math.prod(shape) * dtype.itemsize:
        raise _corrupt(uri, f"{os.path.basename(path)}: tensor {k} has {e - b} bytes for shape {shape} {dtype}")
    self._data = _ByteSource(uri, fs, [path], [size])

  def read(self, key, rows: Optional[int] = None, dtype: Optional[np.dtype] = None) -> np.ndarray:
    """Tensor `key` (or only its first `rows` rows: a byte prefix, the rest is never read) as `dtype` (default:
    stored), cast while reading."""
    stored, shape, b, _ = self.entries[key]
    if rows is not None and rows < shape[0]:
      shape = (rows,) + shape[1:]
    arr, _ = _read_cast(self._data, self.data_start + b, shape, stored, dtype,
                        f"tensor {key} in {os.path.basename(self.path)}")
    return arr

  def close(self):
    self._data.close()


def _write_safetensors_header(f, entries: list[tuple[str, np.dtype, tuple[int, ...]]]) -> None:
  header, offset = {"__metadata__": {"format": "pt"}}, 0
  for key, dtype, shape in entries:
    n = math.prod(shape) * dtype.itemsize
    header[key] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
    offset += n
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)
  f.write(struct.pack("<Q", len(raw)) + raw)


# ---------------------------------------------------------------------------------------------------------------
# big_vision <-> Hugging Face mapping (spec §7). HF names below use the legacy hub spelling.

_VIS = "vision_tower.vision_model."
_TXT = "language_model.model."
_SPELLINGS = (  # (prefix as found, canonical prefix); first match wins.
    ("model.vision_tower.vision_model.", _VIS), ("model.vision_tower.", _VIS),
    ("vision_tower.vision_model.", _VIS), ("vision_tower.", _VIS),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.language_model.", _TXT), ("language_model.model.", _TXT),
    ("language_model.lm_head.", "language_model.lm_head."), ("lm_head.", "language_model.lm_head."),
)
# Present in HF files but not part of PaliGemma's forward: the tied lm_head, SigLIP's unused MAP head, RoPE buffers.
_IGNORED_HF = re.compile(r"^(language_model\.lm_head\..*|vision_tower\.vision_model\.head\..*|.*\.rotary_emb\.inv_freq)$")


def canonical_hf_key(key: str) -> str:
  """Any transformers spelling (legacy hub, v4.5x `model.*`, v5 save) → legacy hub spelling."""
  for found, canon in _SPELLINGS:
    if key.startswith(found):
      return canon + key[len(found):]
  return key


@dataclasses.dataclass(frozen=True)
class _Rule:
  """One big_vision tensor ← HF tensor(s). `stacked`: per layer `{i}`, BV stacks on a leading depth axis."""
  bv: str
  hf: tuple[str, ...]
  to_bv: Callable[..., np.ndarray]   # HF arrays (one layer) → BV array (one layer)
  to_hf: Callable[[np.ndarray], tuple[np.ndarray, ...]]
  stacked: bool = False
  vocab_rows: bool = False           # HF rows beyond the BV vocabulary are dropped


def _same(x):
  return x


def _rules(cfg: configs.PaliGemmaConfig) -> list[_Rule]:
  """The BV ↔ HF table for `cfg`, one rule per big_vision name of `configs.param_shapes(cfg)`."""
  t, v = cfg.text, cfg.vision
  N, K, H, D = t.num_heads, t.num_kv_heads, t.head_dim, t.width
  Nv, Hv, W = v.num_heads, v.head_dim, v.width
  blk, mha = "img/Transformer/encoderblock", "img/Transformer/encoderblock/MultiHeadDotProductAttention_0"
  vl, tl = _VIS + "encoder.layers.{i}.", _TXT + "layers.{i}."
  ident = lambda x: (x,)
  transpose = lambda x: (x.T,)
  r = [
      _Rule("img/embedding/kernel", (_VIS + "embeddings.patch_embedding.weight",),
            lambda w: w.transpose(2, 3, 1, 0), lambda k: (k.transpose(3, 2, 0, 1),)),   # OIHW <-> HWIO
      _Rule("img/embedding/bias", (_VIS + "embeddings.patch_embedding.bias",), _same, ident),
      _Rule("img/pos_embedding", (_VIS + "embeddings.position_embedding.weight",),
            lambda w: w[None], lambda p: (p.reshape(-1, p.shape[-1]),)),
      _Rule("img/Transformer/encoder_norm/scale", (_VIS + "post_layernorm.weight",), _same, ident),
      _Rule("img/Transformer/encoder_norm/bias", (_VIS + "post_layernorm.bias",), _same, ident),
      _Rule("img/head/kernel", ("multi_modal_projector.linear.weight",), lambda w: w.T, transpose),
      _Rule("img/head/bias", ("multi_modal_projector.linear.bias",), _same, ident),
      _Rule(f"{blk}/MlpBlock_0/Dense_0/kernel", (vl + "mlp.fc1.weight",), lambda w: w.T, transpose, True),
      _Rule(f"{blk}/MlpBlock_0/Dense_1/kernel", (vl + "mlp.fc2.weight",), lambda w: w.T, transpose, True),
      _Rule(f"{blk}/MlpBlock_0/Dense_0/bias", (vl + "mlp.fc1.bias",), _same, ident, True),
      _Rule(f"{blk}/MlpBlock_0/Dense_1/bias", (vl + "mlp.fc2.bias",), _same, ident, True),
      # [W, Nv, Hv] <-> [Nv*Hv, W]; [Nv, Hv, W] <-> [W, Nv*Hv].
      _Rule(f"{mha}/out/kernel", (vl + "self_attn.out_proj.weight",),
            lambda w: w.T.reshape(-1, Hv, w.shape[0]), lambda k: (k.reshape(-1, k.shape[-1]).T,), True),
      _Rule(f"{mha}/out/bias", (vl + "self_attn.out_proj.bias",), _same, ident, True),
      _Rule("llm/embedder/input_embedding", (_TXT + "embed_tokens.weight",), _same, ident, vocab_rows=True),
      _Rule("llm/final_norm/scale", (_TXT + "norm.weight",), _same, ident),
      # q [N, D, H] <-> q_proj [N*H, D]: q[n, d, h] = q_proj[n*H + h, d].
      _Rule("llm/layers/attn/q_einsum/w", (tl + "self_attn.q_proj.weight",),
            lambda w: w.reshape(-1, H, w.shape[-1]).transpose(0, 2, 1),
            lambda q: (q.transpose(0, 2, 1).reshape(-1, q.shape[1]),), True),
      # kv [2, K, D, H] <-> k_proj, v_proj [K*H, D].
      _Rule("llm/layers/attn/kv_einsum/w", (tl + "self_attn.k_proj.weight", tl + "self_attn.v_proj.weight"),
            lambda k, v: np.stack([x.reshape(-1, H, x.shape[-1]).transpose(0, 2, 1) for x in (k, v)]),
            lambda kv: tuple(x.transpose(0, 2, 1).reshape(-1, x.shape[1]) for x in kv), True),
      # attn_vec [N, H, D] <-> o_proj [D, N*H]: attn_vec[n, h, d] = o_proj[d, n*H + h].
      _Rule("llm/layers/attn/attn_vec_einsum/w", (tl + "self_attn.o_proj.weight",),
            lambda w: w.T.reshape(-1, H, w.shape[0]), lambda a: (a.reshape(-1, a.shape[-1]).T,), True),
      # gating [2, D, F] <-> gate_proj, up_proj [F, D]; linear [F, D] <-> down_proj [D, F].
      _Rule("llm/layers/mlp/gating_einsum", (tl + "mlp.gate_proj.weight", tl + "mlp.up_proj.weight"),
            lambda g, u: np.stack([g.T, u.T]), lambda w: (w[0].T, w[1].T), True),
      _Rule("llm/layers/mlp/linear", (tl + "mlp.down_proj.weight",), lambda w: w.T, transpose, True),
      _Rule("llm/layers/pre_attention_norm/scale", (tl + "input_layernorm.weight",), _same, ident, True),
  ]
  for i, ln in enumerate(("LayerNorm_0", "LayerNorm_1")):
    for bv, hf in (("scale", "weight"), ("bias", "bias")):
      r.append(_Rule(f"{blk}/{ln}/{bv}", (vl + f"layer_norm{i + 1}.{hf}",), _same, ident, True))
  for x, hf in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
    r.append(_Rule(f"{mha}/{x}/kernel", (vl + f"self_attn.{hf}.weight",),
                   lambda w: w.T.reshape(w.shape[1], -1, Hv), lambda k: (k.reshape(k.shape[0], -1).T,), True))
    r.append(_Rule(f"{mha}/{x}/bias", (vl + f"self_attn.{hf}.bias",),
                   lambda b: b.reshape(-1, Hv), lambda b: (b.reshape(-1),), True))
  norms = ((("pre_ffw_norm", "post_attention_layernorm"),) if not t.post_norms else
           (("post_attention_norm", "post_attention_layernorm"), ("pre_ffw_norm", "pre_feedforward_layernorm"),
            ("post_ffw_norm", "post_feedforward_layernorm")))
  for bv, hf in norms:  # Gemma 1 HF `post_attention_layernorm` is BV `pre_ffw_norm` (sic).
    r.append(_Rule(f"llm/layers/{bv}/scale", (tl + f"{hf}.weight",), _same, ident, True))
  del W, N, K, D  # (documentation only)
  return sorted(r, key=lambda x: x.bv)


def _shape_of(fn, *shapes_dtypes) -> Optional[tuple[int, ...]]:
  """Shape of fn(arrays) without data: applied to zero-stride arrays. None if the shapes do not fit."""
  args = [np.broadcast_to(np.zeros((), np.int8), s) for s in shapes_dtypes]
  try:
    out = fn(*args)
  except ValueError:
    return None
  return tuple(o.shape for o in out) if isinstance(out, tuple) else out.shape


# ---------------------------------------------------------------------------------------------------------------
# Configs from shapes (big_vision) and from config.json (Hugging Face).


def _dims(cfg: configs.PaliGemmaConfig):
  t = cfg.text
  return (cfg.vision, cfg.image_size, t.width, t.depth, t.mlp_dim, t.num_heads, t.num_kv_heads, t.head_dim,
          t.vocab_size, t.post_norms)


def _named_variant(cfg: configs.PaliGemmaConfig) -> Optional[configs.PaliGemmaConfig]:
  return next((v for v in configs.VARIANTS.values() if _dims(v) == _dims(cfg)), None)


def config_from_shapes(shapes: Mapping[str, tuple[int, ...]], uri: str = "") -> configs.PaliGemmaConfig:
  """Architecture from big_vision tensor shapes; big_vision numerics (Gemma 2: attn softcap 50, final 0, no
  sliding window). A registered variant with the same dimensions is returned as is (e.g. 28B query scale)."""
  blk = "img/Transformer/encoderblock"
  need = ["img/embedding/kernel", "img/pos_embedding", f"{blk}/LayerNorm_0/scale", f"{blk}/MlpBlock_0/Dense_0/kernel",
          f"{blk}/MultiHeadDotProductAttention_0/query/kernel", "llm/embedder/input_embedding",
          "llm/layers/attn/q_einsum/w", "llm/layers/attn/kv_einsum/w", "llm/layers/mlp/gating_einsum"]
  missing = [k for k in need if k not in shapes]
  if missing:
    raise MissingKeyError(f"checkpoint {uri} lacks {', '.join(missing)}: cannot infer the model config "
                          "(pass variant=... or fix the checkpoint)")
  try:
    p, _, _, W = shapes["img/embedding/kernel"]
    P = shapes["img/pos_embedding"][1]
    Lv = shapes[f"{blk}/LayerNorm_0/scale"][0]
    Fv = shapes[f"{blk}/MlpBlock_0/Dense_0/kernel"][2]
    Nv = shapes[f"{blk}/MultiHeadDotProductAttention_0/query/kernel"][2]
    V, D = shapes["llm/embedder/input_embedding"]
    L, N, _, H = shapes["llm/layers/attn/q_einsum/w"]
    K = shapes["llm/layers/attn/kv_einsum/w"][2]
    F = shapes["llm/layers/mlp/gating_einsum"][3]
  except (ValueError, IndexError) as e:
    raise ShapeMismatchError(f"checkpoint {uri}: unexpected tensor rank, cannot infer the config ({e})") from None
  gen2 = "llm/layers/post_attention_norm/scale" in shapes
  cfg = configs.PaliGemmaConfig(
      "custom", configs.VisionConfig(width=W, depth=Lv, mlp_dim=Fv, num_heads=Nv, patch_size=p),
      configs.TextConfig(width=D, depth=L, mlp_dim=F, num_heads=N, num_kv_heads=K, head_dim=H, vocab_size=V,
                         query_scale=H ** -0.5, attn_logits_softcap=50.0 if gen2 else 0.0, post_norms=gen2),
      image_size=math.isqrt(P) * p)
  return _named_variant(cfg) or cfg


# transformers' defaults for keys a config.json may omit (configuration_{gemma,gemma2,siglip,paligemma}.py).
_HF_TEXT_DEFAULTS = {
    "gemma": dict(hidden_size=3072, num_hidden_layers=28, intermediate_size=24576, num_attention_heads=16,
                  num_key_value_heads=16, head_dim=256, rope_theta=10000.0),
    "gemma2": dict(hidden_size=2304, num_hidden_layers=26, intermediate_size=9216, num_attention_heads=8,
                   num_key_value_heads=4, head_dim=256, rope_theta=10000.0, query_pre_attn_scalar=256,
                   attn_logit_softcapping=50.0, final_logit_softcapping=30.0, sliding_window=4096),
}
_HF_PG_TEXT = dict(model_type="gemma", hidden_size=2048, num_hidden_layers=18, intermediate_size=16384,
                   num_attention_heads=8, num_key_value_heads=1, vocab_size=257152)  # PaliGemmaConfig(text_config=None)
_HF_VISION_DEFAULTS = dict(hidden_size=768, num_hidden_layers=12, intermediate_size=3072, num_attention_heads=12,
                           patch_size=16, image_size=224)
_HF_PG_VISION = dict(hidden_size=1152, num_hidden_layers=27, intermediate_size=4096, num_attention_heads=16,
                     patch_size=14, image_size=224)  # PaliGemmaConfig(vision_config=None)


def config_from_hf(hf: Mapping[str, Any], num_patches: Optional[int] = None, vocab_rows: Optional[int] = None,
                   uri: str = "") -> configs.PaliGemmaConfig:
  """PaliGemmaConfig from a HF PaliGemma config.json (dict), with HF numerics (softcaps, sliding window as HF has
  them). `num_patches`/`vocab_rows` (from tensor shapes) override image_size/vocab, which old configs omit."""
  tc = hf.get("text_config")
  tc = dict(_HF_PG_TEXT) if tc is None else dict(tc)
  mt = tc.get("model_type", "gemma")
  if mt not in _HF_TEXT_DEFAULTS:
    raise UnknownFormatError(f"checkpoint {uri}: text model_type {mt!r} is not gemma or gemma2")
  tc = {**_HF_TEXT_DEFAULTS[mt], **{k: v for k, v in tc.items() if v is not None or k.endswith("softcapping")
                                    or k == "sliding_window"}}
  vc = hf.get("vision_config")
  vc = {**_HF_VISION_DEFAULTS, **(_HF_PG_VISION if vc is None else vc)}
  H = tc["head_dim"]
  rope = (tc.get("rope_parameters") or {}).get("rope_theta", tc.get("rope_theta", 10000.0))
  gen2 = mt == "gemma2"
  if gen2:
    sliding = tc.get("sliding_window")
    if "layer_types" in tc and "sliding_attention" not in tc["layer_types"]:
      sliding = None
    text_kw = dict(query_scale=float(tc["query_pre_attn_scalar"]) ** -0.5,
                   attn_logits_softcap=float(tc.get("attn_logit_softcapping") or 0.0),
                   final_logits_softcap=float(tc.get("final_logit_softcapping") or 0.0),
                   post_norms=True, sliding_window=sliding)
  else:
    text_kw = dict(query_scale=H ** -0.5)
  vocab = tc.get("vocab_size", hf.get("vocab_size", configs.VOCAB_SIZE)) if vocab_rows is None else vocab_rows
  vision = configs.VisionConfig(width=vc["hidden_size"], depth=vc["num_hidden_layers"], mlp_dim=vc["intermediate_size"],
                                num_heads=vc["num_attention_heads"], patch_size=vc["patch_size"])
  image_size = vc["image_size"] if num_patches is None else math.isqrt(num_patches) * vision.patch_size
  text = configs.TextConfig(
      width=tc["hidden_size"], depth=tc["num_hidden_layers"], mlp_dim=tc["intermediate_size"],
      num_heads=tc["num_attention_heads"], num_kv_heads=tc["num_key_value_heads"], head_dim=H,
      vocab_size=min(vocab, configs.VOCAB_SIZE), rope_base=float(rope), **text_kw)
  cfg = configs.PaliGemmaConfig("custom", vision, text, image_size)
  named = _named_variant(cfg)
  return dataclasses.replace(cfg, name=named.name) if named else cfg


def hf_config_dict(cfg: configs.PaliGemmaConfig, dtype: str = "float32") -> dict:
  """config.json for transformers' PaliGemmaForConditionalGeneration reproducing `cfg`'s numerics."""
  t, v = cfg.text, cfg.vision
  vocab = _hf_vocab_rows(t.vocab_size)
  text = dict(model_type="gemma2" if t.post_norms else "gemma", hidden_size=t.width, num_hidden_layers=t.depth,
              intermediate_size=t.mlp_dim, num_attention_heads=t.num_heads, num_key_value_heads=t.num_kv_heads,
              head_dim=t.head_dim, vocab_size=vocab, rope_theta=t.rope_base, rms_norm_eps=1e-6,
              hidden_activation="gelu_pytorch_tanh", hidden_act="gelu_pytorch_tanh", max_position_embeddings=8192,
              num_image_tokens=cfg.num_image_tokens, torch_dtype=dtype)
  if t.post_norms:
    scalar = t.query_scale ** -2
    if abs(scalar - round(scalar)) > 1e-3:
      raise CheckpointError(f"query_scale {t.query_scale} is not rsqrt of an integer; HF cannot express it")
    text.update(query_pre_attn_scalar=int(round(scalar)),
                attn_logit_softcapping=t.attn_logits_softcap or None,
                final_logit_softcapping=t.final_logits_softcap or None,
                sliding_window=t.sliding_window or 8192,
                layer_types=[("sliding_attention" if t.sliding_window and i % 2 == 0 else "full_attention")
                             for i in range(t.depth)])
  elif not math.isclose(t.query_scale, t.head_dim ** -0.5) or t.attn_logits_softcap or t.final_logits_softcap:
    raise CheckpointError("HF Gemma 1 cannot express a query scale other than head_dim**-0.5 or softcaps")
  vision = dict(model_type="siglip_vision_model", hidden_size=v.width, num_hidden_layers=v.depth,
                intermediate_size=v.mlp_dim, num_attention_heads=v.num_heads, patch_size=v.patch_size,
                image_size=cfg.image_size, projection_dim=t.width, num_image_tokens=cfg.num_image_tokens,
                vision_use_head=False, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
  return dict(architectures=["PaliGemmaForConditionalGeneration"], model_type="paligemma",
              image_token_index=t.vocab_size, vocab_size=vocab, projection_dim=t.width, hidden_size=t.width,
              pad_token_id=0, bos_token_id=2, eos_token_id=1, tie_word_embeddings=True, torch_dtype=dtype,
              text_config=text, vision_config=vision, pgbatch_variant=cfg.name)


def _hf_vocab_rows(v: int) -> int:
  """HF converters: resize_token_embeddings(vocab + 2, pad_to_multiple_of=64) → 257216 for 257152."""
  return -(-(v + 2) // 64) * 64


# ---------------------------------------------------------------------------------------------------------------
# The checkpoint object.


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


def _resolve(uri: str):
  try:
    fs, path = fsspec.core.url_to_fs(uri)
  except (ImportError, ValueError) as e:
    raise CheckpointError(f"cannot open checkpoint {uri}: {e}") from None
  return fs, path.rstrip("/")


def _info(fs, path):
  try:
    return fs.info(path)
  except (FileNotFoundError, NotADirectoryError):
    return None


def open_checkpoint(uri: str, variant: Optional[str] = None) -> Checkpoint:
  """Opens a big_vision .npz (also `.b16.npz`/`.f16.npz` and split `.npz.partNN`) or a HF safetensors directory
  at any fsspec URL (local path, file://, gs://, s3://, hf://, …).

  Reads only headers. The config is inferred from the tensor shapes (big_vision) or config.json (HF).
  `variant` names a registered config that replaces the inferred one; it is checked against the tensor
  shapes (raises MissingKeyError/UnexpectedKeyError/ShapeMismatchError). Every failure is a CheckpointError
  whose message names the URI.
  """
  uri = str(uri)
  try:
    ck = _open(uri, variant)
  except CheckpointError:
    raise
  except FileNotFoundError as e:
    raise CheckpointNotFoundError(f"checkpoint not found: {uri} ({e})") from None
  except (OSError, EOFError, ValueError) as e:
    raise CheckpointError(f"cannot read checkpoint {uri}: {type(e).__name__}: {e}") from None
  if variant is not None:
    try:
      cfg = configs.get(variant)
    except ValueError as e:
      ck.close()
      raise CheckpointError(str(e)) from None
    try:
      ck.check(cfg)
    except CheckpointError:
      ck.close()
      raise
    ck.config = cfg
  return ck


def _open(uri: str, variant: Optional[str]) -> Checkpoint:
  fs, path = _resolve(uri)
  info = _info(fs, path)
  if info is not None and info.get("type") != "directory" and (os.path.basename(path) in (
      "config.json", "model.safetensors", "model.safetensors.index.json") or path.endswith(".safetensors")):
    path, info = os.path.dirname(path), _info(fs, os.path.dirname(path))
  is_dir = info is not None and info.get("type") == "directory"
  if not is_dir and not _NPZ_NAME.match(path) and _info(fs, f"{path}/config.json") is not None:
    is_dir = True  # stores without directories (http://): a HF layout is known by its config.json
  if is_dir:
    return _open_hf(uri, fs, path)
  return _open_npz(uri, fs, path, info, variant)


_NPZ_NAME = re.compile(r".*\.npz(\.part\d+)?$")


def _open_npz(uri, fs, path, info, variant=None) -> Checkpoint:
  base = re.sub(r"\.part\d+$", "", path)
  if info is None or base != path:
    parts = sorted(fs.glob(glob_escape(base) + ".part*"))
    parts = [p for p in parts if re.fullmatch(r".*\.part\d+", p)]
    if not parts:
      raise CheckpointNotFoundError(f"checkpoint not found: {uri}" + (
          "" if _NPZ_NAME.match(path) else " (expected a big_vision .npz file, split .npz.partNN files, or a "
          "Hugging Face directory)"))
    nums = [int(re.search(r"\.part(\d+)$", p).group(1)) for p in parts]
    order = sorted(range(len(parts)), key=lambda i: nums[i])
    parts, nums = [parts[i] for i in order], [nums[i] for i in order]
    if nums != list(range(nums[0], nums[0] + len(nums))) or nums[0] not in (0, 1):
      gaps = sorted(set(range(nums[0], nums[-1] + 1)) - set(nums)) if nums[0] in (0, 1) else [0]
      raise _corrupt(uri, f"split parts are not consecutive: found part numbers {nums}, missing {gaps}")
    infos = [fs.info(p) for p in parts]
  else:
    parts, infos = [path], [info]
    with _open_read(fs, path) as f:
      magic = f.read(4)
    if magic != b"PK\x03\x04":
      if magic[:2] == b"PK" or _NPZ_NAME.match(path):
        raise _corrupt(uri, f"not a zip/npz file (first bytes {magic!r})")
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
  return Checkpoint(_make_info(uri, FORMAT_NPZ, fs, infos), cfg, shapes, npz.read, closer=npz.close)


def glob_escape(path: str) -> str:
  return re.sub(r"([*?\[\]])", r"[\1]", path)


def _open_hf(uri, fs, path) -> Checkpoint:
  join = lambda name: f"{path}/{name}"
  cfg_info = _info(fs, join("config.json"))
  index_info, single_info = _info(fs, join("model.safetensors.index.json")), _info(fs, join("model.safetensors"))
  if cfg_info is None or (index_info is None and single_info is None):
    found = sorted(os.path.basename(p) for p in fs.ls(path, detail=False))[:10]
    if not found:
      raise CheckpointNotFoundError(f"checkpoint not found: {uri} is an empty directory")
    hint = ("; PyTorch .bin weights are pickles and are not read: save them as safetensors first "
            "(transformers: save_pretrained(dir, safe_serialization=True))" if any(
                f.endswith(".bin") for f in found) else "")
    raise UnknownFormatError(f"cannot tell the format of {uri}: a directory needs config.json and "
                             f"model.safetensors or model.safetensors.index.json (Hugging Face layout); "
                             f"found {', '.join(found)}{hint}")
  try:
    hf_cfg = json.loads(fs.cat_file(join("config.json")))
  except ValueError as e:
    raise _corrupt(uri, f"config.json is not valid JSON ({e})") from None
  if index_info is not None:
    try:
      weight_map = json.loads(fs.cat_file(join("model.safetensors.index.json")))["weight_map"]
      files = sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
      raise _corrupt(uri, f"model.safetensors.index.json is not a safetensors index ({e!r})") from None
  else:
    files, weight_map = ["model.safetensors"], None
  infos, readers = [cfg_info] + ([index_info] if index_info else []), {}
  close = lambda: [r.close() for r in readers.values()]
  for name in files:
    i = _info(fs, join(name))
    if i is None:
      raise _corrupt(uri, f"shard {name} named in model.safetensors.index.json is missing")
    infos.append(i)
    readers[name] = _Safetensors(uri, fs, join(name), int(i["size"]))
  # canonical HF key → (file, key as stored).
  where = {}
  for fname, st in readers.items():
    for key in st.entries:
      if weight_map is not None and weight_map.get(key, fname) != fname:
        continue
      where[canonical_hf_key(key)] = (fname, key)
  if weight_map is not None:
    for key, fname in weight_map.items():
      if canonical_hf_key(key) not in where:
        raise _corrupt(uri, f"model.safetensors.index.json maps {key} to {fname}, which does not contain it")
  entry = lambda k: readers[where[k][0]].entries[where[k][1]]
  src = lambda k: f"{where[k][1]} in {where[k][0]}"
  pos = where.get(_VIS + "embeddings.position_embedding.weight")
  emb = where.get(_TXT + "embed_tokens.weight")
  cfg = config_from_hf(hf_cfg, num_patches=entry(_VIS + "embeddings.position_embedding.weight")[1][0] if pos else None,
                       vocab_rows=entry(_TXT + "embed_tokens.weight")[1][0] if emb else None, uri=uri)
  shapes, plan, sources, missing, used = {}, {}, {}, {}, set()
  in_files = " or ".join(files)
  for rule in _rules(cfg):
    layers = range(cfg.text.depth if rule.bv.startswith("llm/") else cfg.vision.depth) if rule.stacked else [None]
    keys = [tuple(k.format(i=i) for k in rule.hf) for i in layers]
    absent = [k for ks in keys for k in ks if k not in where]
    used.update(k for ks in keys for k in ks if k in where)
    if absent:
      missing[rule.bv] = f"HF {', '.join(absent[:4])}{' …' if len(absent) > 4 else ''} not found in {in_files}"
      continue
    layer_shapes = [tuple(entry(k)[1] for k in ks) for ks in keys]
    odd = next((i for i, s in enumerate(layer_shapes) if s != layer_shapes[0]), None)
    sources[rule.bv] = "HF " + ", ".join(src(k) for k in keys[0])
    if odd is not None:  # one layer differs: report that layer's HF tensors and shapes
      shapes[rule.bv] = (tuple(layer_shapes[odd][0]), entry(keys[odd][0])[0])
      sources[rule.bv] = f"HF {', '.join(src(k) for k in keys[odd])} differs from layer 0 {layer_shapes[0]}"
      continue
    bv_shape = _shape_of(rule.to_bv, *layer_shapes[0])
    if bv_shape is None:  # the tensor does not fit config.json's heads/head_dim: report the HF shape
      bv_shape = layer_shapes[0][0]
    if rule.vocab_rows:
      bv_shape = (min(bv_shape[0], cfg.text.vocab_size),) + bv_shape[1:]
    if rule.stacked:
      bv_shape = (len(keys),) + bv_shape
    shapes[rule.bv] = (bv_shape, entry(keys[0][0])[0])
    plan[rule.bv] = (rule, keys)
  for k in sorted(set(where) - used):
    if not _IGNORED_HF.match(k):
      shapes[k] = (entry(k)[1], entry(k)[0])
      sources[k] = f"HF {src(k)}"

  def read(name, dtype=None):
    if name not in plan:
      fname, key = where[name]
      return readers[fname].read(key, dtype=dtype)
    rule, keys = plan[name]
    shape, stored = shapes[name]
    rows = shape[-2] if rule.vocab_rows else None
    get = lambda k, d=None: readers[where[k][0]].read(where[k][1], rows=rows, dtype=d)
    if rule.to_bv is _same and not rule.stacked:  # as stored: stream with the cast
      return get(keys[0][0], dtype)
    out = np.empty(shape, stored if dtype is None else dtype)
    if not rule.stacked:
      out[...] = rule.to_bv(*[get(k) for k in keys[0]])
    for i, ks in enumerate(keys if rule.stacked else []):  # one layer at a time, cast into the stack
      out[i] = rule.to_bv(*[get(k) for k in ks])
    return out

  return Checkpoint(_make_info(uri, FORMAT_HF, fs, infos), cfg, shapes, read, sources, missing, close)


def place(ckpt: Checkpoint, dtype=None, mesh=None) -> Iterator[tuple[str, Any]]:
  """Yields (name, jax.Array): each tensor read (cast to `dtype` while reading), then put on its
  `sharding.param_sharding` over `mesh` (or the default device). At most one transfer is in flight, so
  host memory holds about one tensor (two while the previous one is still being copied)."""
  import jax  # pylint: disable=g-import-not-at-top
  from pgbatch.model import sharding  # pylint: disable=g-import-not-at-top
  dtype = None if dtype is None else np.dtype(dtype)
  prev = None
  for name, array in ckpt.tensors(dtype=dtype):
    target = sharding.param_sharding(name, array.shape, mesh) if mesh is not None else None
    placed = jax.device_put(array, target)
    del array
    if prev is not None:
      prev.block_until_ready()
    prev = placed
    yield name, placed
  if prev is not None:
    prev.block_until_ready()


# ---------------------------------------------------------------------------------------------------------------
# Writing Hugging Face safetensors.


def _hf_tensors(rule: _Rule, arr: np.ndarray, cfg) -> Iterator[tuple[str, np.ndarray]]:
  """(HF key, HF array) for one big_vision tensor."""
  if rule.vocab_rows:
    pad = _hf_vocab_rows(arr.shape[0]) - arr.shape[0]
    yield rule.hf[0], np.concatenate([arr, np.zeros((pad,) + arr.shape[1:], arr.dtype)])
    return
  for i, layer in (enumerate(arr) if rule.stacked else [(None, arr)]):
    for key, x in zip(rule.hf, rule.to_hf(layer)):
      yield key.format(i=i), np.ascontiguousarray(x)


def _hf_layout(cfg, shapes: Mapping[str, tuple[tuple[int, ...], np.dtype]]):
  """[(bv name, rule, [(HF key, dtype, shape)])] in the order of `shapes`."""
  rules = {r.bv: r for r in _rules(cfg)}
  extra = [k for k in shapes if k not in rules]
  if extra:
    raise UnexpectedKeyError(f"cannot write HF: no HF name for {', '.join(extra)}")
  out = []
  for name, (shape, dtype) in shapes.items():
    rule = rules[name]
    if rule.vocab_rows:
      entries = [(rule.hf[0], dtype, (_hf_vocab_rows(shape[0]),) + tuple(shape[1:]))]
    else:
      per_layer = _shape_of(rule.to_hf, shape[1:] if rule.stacked else shape)
      layers = range(shape[0]) if rule.stacked else [None]
      entries = [(k.format(i=i), dtype, s) for i in layers for k, s in zip(rule.hf, per_layer)]
    out.append((name, rule, entries))
  return out


def write_hf_stream(items: Iterable[tuple[str, np.ndarray]], shapes, cfg, dir_uri: str,
                     max_shard_bytes: Optional[int] = None) -> None:
  """Writes tensors arriving one at a time in the order of `shapes` (name → (shape, dtype)) as HF safetensors."""
  check = Checkpoint(CheckpointInfo(dir_uri, "params", "", ()), cfg, dict(shapes), None)
  check.check(cfg)
  layout = _hf_layout(cfg, shapes)
  flat = [e for _, _, entries in layout for e in entries]
  shards, size = [[]], 0
  for e in flat:  # greedy, in order
    n = math.prod(e[2]) * e[1].itemsize
    if max_shard_bytes and shards[-1] and size + n > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(e)
    size += n
  names = (["model.safetensors"] if len(shards) == 1 else
           [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
  fs, path = _resolve(dir_uri)
  if _is_local(fs):
    fs.makedirs(path, exist_ok=True)
  dtypes = {str(d) for _, d, _ in flat}
  dtype = "bfloat16" if "bfloat16" in dtypes else ("float16" if "float16" in dtypes else "float32")
  stale = [p for p in (fs.ls(path, detail=False) if fs.exists(path) else [])
           if re.fullmatch(r"model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?", os.path.basename(p))
           and os.path.basename(p) not in names]
  for p in stale:  # weights of an earlier conversion into the same directory would shadow or confuse these
    fs.rm(p)
  fs.pipe_file(f"{path}/config.json", json.dumps(hf_config_dict(cfg, dtype), indent=1).encode())
  if len(shards) > 1:
    index = dict(metadata=dict(total_size=sum(math.prod(s) * d.itemsize for _, d, s in flat)),
                 weight_map={k: names[i] for i, shard in enumerate(shards) for k, _, _ in shard})
    fs.pipe_file(f"{path}/model.safetensors.index.json", json.dumps(index, indent=1).encode())
  where = {k: i for i, shard in enumerate(shards) for k, _, _ in shard}
  expect = iter(layout)
  cur, f = -1, None
  try:
    for name, arr in items:
      lname, rule, entries = next(expect)
      if name != lname or tuple(arr.shape) != tuple(shapes[name][0]):
        raise CheckpointError(f"write_hf: got {name} {arr.shape}, expected {lname} {shapes[lname][0]}")
      for (key, x), (ekey, edtype, eshape) in zip(_hf_tensors(rule, arr, cfg), entries):
        assert key == ekey and x.shape == tuple(eshape) and x.dtype == edtype, (key, ekey, x.shape, eshape)
        if where[key] != cur:
          if f is not None:
            f.close()
          cur = where[key]
          f = fs.open(f"{path}/{names[cur]}", "wb")
          _write_safetensors_header(f, shards[cur])
        f.write(memoryview(x.reshape(-1).view(np.uint8)))
  finally:
    if f is not None:
      f.close()


def write_hf(flat_params: Mapping[str, np.ndarray], cfg: configs.PaliGemmaConfig, dir_uri: str,
             max_shard_bytes: Optional[int] = None) -> None:
  """Writes big_vision params as a HF PaliGemma directory: config.json + model.safetensors, or shards
  `model-0000i-of-0000n.safetensors` + model.safetensors.index.json when `max_shard_bytes` is exceeded.
  Legacy hub key spelling; embeddings padded to 257216 rows (zeros) like the HF converters; lm_head tied."""
  names = sorted(flat_params)
  shapes = {k: (tuple(flat_params[k].shape), flat_params[k].dtype) for k in names}
  write_hf_stream(((k, flat_params[k]) for k in names), shapes, cfg, dir_uri, max_shard_bytes)


# ---------------------------------------------------------------------------------------------------------------
# `pgbatch convert SRC DST`.


def register_convert(parser) -> None:
  parser.add_argument("src", help="checkpoint URL: big_vision .npz (or .npz.partNN) or a HF directory")
  parser.add_argument("dst", help="destination URL: ends with .npz → big_vision, otherwise a HF directory")
  parser.add_argument("--variant", default=None, help="registered variant to check the source against")
  parser.add_argument("--max-shard-bytes", type=int, default=None, help="HF output: shard above this size")


def main_convert(args) -> int:
  """Streams SRC into DST one tensor at a time."""
  t0 = time.perf_counter()
  try:
    ck = open_checkpoint(args.src, args.variant)
    ck.check(ck.config)
    shapes = ck.names_and_shapes()
    nbytes = sum(math.prod(s) * d.itemsize for s, d in shapes.values())
    if args.dst.rstrip("/").endswith(".npz"):
      write_npz_stream(ck.tensors(), args.dst)
    else:
      write_hf_stream(ck.tensors(), shapes, ck.config, args.dst, args.max_shard_bytes)
  except CheckpointError as e:
    print(f"pgbatch convert: {e}", file=sys.stderr)
    return 1
  print(f"converted {args.src} ({ck.info.format}, {ck.config.name}, {len(shapes)} tensors, {nbytes / 1e9:.2f} GB) "
        f"→ {args.dst} in {time.perf_counter() - t0:.1f}s")
  return 0
