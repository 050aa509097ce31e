"""safetensors files (header: u64 little-endian length + JSON; then raw row-major tensors), read on demand
without the `safetensors` package: a header checked against the file size, tensors streamed through a byte
source and cast while reading."""
from __future__ import annotations

import json
import math
import os
import struct
from typing import Optional

import ml_dtypes
import numpy as np

from pgbatch.checkpoints.errors import corrupt
from pgbatch.checkpoints.sources import ByteSource, open_read, read_cast

BF16 = np.dtype(ml_dtypes.bfloat16)
ST_DTYPES = {"F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": BF16,
              "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
              "U8": np.dtype("u1"), "BOOL": np.dtype("?")}


ST_NAMES = {v: k for k, v in ST_DTYPES.items()}




class SafetensorsFile:
  """One safetensors file: header parsed eagerly and checked against the file size; tensors read on demand."""

  def __init__(self, uri, fs, path, size):
    self.uri, self.fs, self.path, self.size = uri, fs, path, size
    with open_read(fs, path) as f:
      head = f.read(8)
      if len(head) < 8:
        raise corrupt(uri, f"{os.path.basename(path)} is shorter than a safetensors header")
      n, = struct.unpack("<Q", head)
      if n > min(size - 8, 100 << 20):
        raise corrupt(uri, f"{os.path.basename(path)}: safetensors header length {n} exceeds the file")
      try:
        header = json.loads(f.read(n))
        self.entries = {k: (ST_DTYPES[v["dtype"]], tuple(v["shape"]), *v["data_offsets"])
                        for k, v in header.items() if k != "__metadata__"}
      except (ValueError, KeyError, TypeError) as e:
        raise corrupt(uri, f"{os.path.basename(path)}: bad safetensors header ({e!r})") from None
    self.data_start = 8 + n
    end = max((e[3] for e in self.entries.values()), default=0)
    if self.data_start + end > size:
      raise corrupt(uri, f"{os.path.basename(path)} is truncated: header declares {self.data_start + end} bytes, "
                     f"file has {size}")
    for k, (dtype, shape, b, e) in self.entries.items():
      if e - b != math.prod(shape) * dtype.itemsize:
        raise corrupt(uri, f"{os.path.basename(path)}: tensor {k} has {e - b} bytes for shape {shape} {dtype}")
    self._data = ByteSource(uri, fs, [path], [size])

  def read(self, key, rows: Optional[int] = None, dtype: Optional[np.dtype] = None) -> np.ndarray:
    """Tensor `key` (or only its first `rows` rows: a byte prefix, the rest is never read) as `dtype` (default:
    stored), cast while reading."""
    stored, shape, b, _ = self.entries[key]
    if rows is not None and rows < shape[0]:
      shape = (rows,) + shape[1:]
    arr, _ = read_cast(self._data, self.data_start + b, shape, stored, dtype,
                        f"tensor {key} in {os.path.basename(self.path)}")
    return arr

  def close(self):
    self._data.close()


def write_header(f, entries: list[tuple[str, np.dtype, tuple[int, ...]]]) -> None:
  header, offset = {"__metadata__": {"format": "pt"}}, 0
  for key, dtype, shape in entries:
    n = math.prod(shape) * dtype.itemsize
    header[key] = {"dtype": ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
    offset += n
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)
  f.write(struct.pack("<Q", len(raw)) + raw)

