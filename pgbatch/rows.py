"""The in-flight row: column names, the one error struct, marking a row error/filtered, isolating a failing row.

A row travels from the reader to the sink as columns of one Ray Data block. What each stage reads and writes:

  read        shard item {id, uris}  -> KEY SHARD SOURCE_URI IMAGE_BYTES METADATA STATUS ERROR SHARD_ROWS READ_AT
  decode      IMAGE_BYTES            -> PIXELS uint8 [B, R, R, 3], WIDTH, HEIGHT, SHA256; STATUS/ERROR (decode)
  safety pre  IMAGE_BYTES            -> SAFETY_PRE; STATUS filtered / error (safety); IMAGE_BYTES dropped after
  annotate    PIXELS, METADATA       -> one column per task, PROVENANCE, SAFETY (null); STATUS/ERROR (annotate);
                                        COMPILES_WARM_UP, COMPILES_MID_JOB
  safety post task columns           -> SAFETY; task columns redacted, or null when withheld; SAFETY_PRE dropped
  commit      everything             -> the output schema (`pgbatch.schema`); internal columns dropped

`status` is "ok" until a stage marks the row "error" (with one ERROR struct: stage, type, message) or
"filtered"; a row that is not "ok" passes every later stage untouched (its first reason is kept). In Python
an error is a dict {"stage", "type", "message"} or None; in Arrow it is `ERROR_TYPE` (the output column's type),
from the reader to the sink. Stages hand Ray Arrow tables built by `to_table`, so a column's type never
depends on the values of one batch (an all-null error column stays a struct).
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import numpy as np
import pyarrow as pa

from pgbatch import schema

KEY, SHARD, SOURCE_URI, METADATA = "key", "shard", "source_uri", "metadata"
IMAGE_BYTES, PIXELS, WIDTH, HEIGHT, SHA256 = "image_bytes", "pixels", "width", "height", "sha256"
STATUS, ERROR, SAFETY, PROVENANCE = "status", "error", "safety", "provenance"
SAFETY_PRE = "safety_pre"     # image findings of the pre stage (JSON), read by the post stage
SHARD_ROWS = "_shard_rows"    # rows read from the row's shard: the driver commits a shard when all arrived
READ_AT = "_read_at"          # epoch seconds when the shard was read (per-shard latency in the manifest)
COMPILES_WARM_UP = "_compiles_warm_up"   # annotate actor's XLA compiles since its previous batch (first row
COMPILES_MID_JOB = "_compiles_mid_job"   # of a batch; 0 elsewhere): the driver sums them into the Summary
INTERNAL = (SHARD_ROWS, READ_AT, COMPILES_WARM_UP, COMPILES_MID_JOB, SAFETY_PRE, IMAGE_BYTES, PIXELS)

OK, FAILED, FILTERED = "ok", "error", "filtered"
STATUSES = (OK, FAILED, FILTERED)
STAGES = ("read", "decode", "annotate", "parse", "safety", "write")
ERROR_TYPE = schema.ERROR_TYPE
MAX_MESSAGE = 2000

# Arrow types of the in-flight columns (task columns are typed by their task; pixels are a Ray tensor column).
TYPES: dict[str, pa.DataType] = {
    KEY: pa.string(), SHARD: pa.string(), SOURCE_URI: pa.string(), METADATA: pa.string(),
    IMAGE_BYTES: pa.binary(), WIDTH: pa.int32(), HEIGHT: pa.int32(), SHA256: pa.string(), STATUS: pa.string(),
    ERROR: ERROR_TYPE, SAFETY_PRE: pa.string(), SHARD_ROWS: pa.int64(), READ_AT: pa.float64(),
    COMPILES_WARM_UP: pa.int64(), COMPILES_MID_JOB: pa.int64(),
    PROVENANCE: schema.PROVENANCE_TYPE, SAFETY: schema.SAFETY_TYPE,
}


def error(stage: str, exc_or_type: Any, message: Optional[str] = None) -> dict:
  """The error struct of a row: `error("decode", exc)` or `error("read", "EmptyShard", "x holds no samples")`."""
  type_ = exc_or_type if isinstance(exc_or_type, str) else type(exc_or_type).__name__
  text = str(exc_or_type) if message is None else message
  return {"stage": stage, "type": type_, "message": text[:MAX_MESSAGE]}


def mark_error(status: list, errors: list, i: int, err: dict) -> None:
  """Row i becomes an error row with `err`, unless an earlier stage already marked it (first reason wins)."""
  if status[i] == OK:
    status[i], errors[i] = FAILED, err


def mark_filtered(status: list, i: int) -> None:
  """Row i is withheld by the safety policy (its task columns are nulled by the post stage)."""
  if status[i] == OK:
    status[i] = FILTERED


def isolate(fn: Callable[[list[int]], Sequence], idx: Sequence[int],
            on_error: Optional[Callable[[BaseException], None]] = None
            ) -> tuple[dict[int, Any], dict[int, BaseException]]:
  """Runs `fn(idx)` (one result per index); when it raises, halves the batch until the failing rows are found.

  Returns ({i: result}, {i: exception}); every index is in exactly one of them. `on_error` sees each exception
  first (e.g. to exit the process on an unrecoverable device error instead of bisecting)."""
  idx = list(idx)
  if not idx:
    return {}, {}
  try:
    out = list(fn(idx))
    if len(out) != len(idx):
      raise RuntimeError(f"stage returned {len(out)} results for {len(idx)} rows")
    return dict(zip(idx, out)), {}
  except Exception as e:  # noqa: BLE001 - isolated below
    if on_error is not None:
      on_error(e)
    if len(idx) == 1:
      return {}, {idx[0]: e}
    half = len(idx) // 2
    ok_a, bad_a = isolate(fn, idx[:half], on_error)
    ok_b, bad_b = isolate(fn, idx[half:], on_error)
    return {**ok_a, **ok_b}, {**bad_a, **bad_b}


def null_column(type_: pa.DataType, n: int) -> pa.Array:
  """n nulls of `type_` whose struct children are valid where they are declared not null (`pa.nulls` leaves
  them null, which Parquet refuses for a non-nullable child)."""
  return pa.array([None] * n, type=type_)


def withhold(col: pa.Array | pa.ChunkedArray, mask: Sequence[bool]) -> pa.Array:
  """`col` with the rows of `mask` set to null (filtered or failed rows lose their task results)."""
  import pyarrow.compute as pc
  col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
  return pc.if_else(pa.array(list(mask), pa.bool_()), null_column(col.type, len(col)), col)


def as_object(values) -> np.ndarray:
  """A 1-d numpy object array (numpy would turn a list of equal-length bytes/lists into a 2-d array)."""
  out = np.empty(len(values), dtype=object)
  out[:] = list(values)
  return out


def to_table(columns: dict[str, Any]) -> pa.Table:
  """Columns (lists, numpy arrays or Arrow arrays) -> an Arrow table, the known columns typed by TYPES; Arrow
  arrays (e.g. the pipeline's Ray tensor column of pixels) keep their type; other columns are inferred."""
  arrays, fields = [], []
  for name, values in columns.items():
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
      arr = values
    elif name in TYPES:
      arr = pa.array([_py(v) for v in values], type=TYPES[name])
    else:
      arr = pa.array([_py(v) for v in values])
    arrays.append(arr)
    fields.append(pa.field(name, arr.type))
  return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def _py(v: Any) -> Any:
  """numpy scalars and NaN (pandas' missing value) as plain Python values."""
  if isinstance(v, np.generic):
    v = v.item()
  if isinstance(v, float) and v != v:
    return None
  return v
