"""Driver side of the output: rows collected per shard until the shard is complete, then committed (atomic
file + manifest entry, retried on transient errors); a shard that cannot be completed is never written."""
from __future__ import annotations

import logging
import time

import pyarrow as pa

from pgbatch.pipeline.plan import SHARD_ROWS

log = logging.getLogger(__name__)


class ShardBuffer:
  """Driver side: collects rows per shard until all `_shard_rows` rows of a shard arrived.

  `add(table)` returns the shards it completed, as (shard id, table with every row of the shard). A shard that
  gets more rows than were read, or rows after it completed, goes to `broken` and is never returned (a rerun
  redoes it): nothing is written twice.
  """

  def __init__(self):
    self.pending: dict[str, list[pa.Table]] = {}
    self.counts: dict[str, int] = {}
    self.complete: list[str] = []
    self.broken: dict[str, str] = {}

  def add(self, table: pa.Table) -> list[tuple[str, pa.Table]]:
    out = []
    for shard_id, part in _group_by_shard(table).items():
      if shard_id in self.broken:
        continue
      if shard_id in self.complete:
        self._break(shard_id, "rows arrived after the shard was complete")
        continue
      self.pending.setdefault(shard_id, []).append(part)
      self.counts[shard_id] = self.counts.get(shard_id, 0) + part.num_rows
      expected = int(part.column(SHARD_ROWS)[0].as_py())
      if self.counts[shard_id] > expected:
        self._break(shard_id, f"{self.counts[shard_id]} rows arrived for {expected} read")
      elif self.counts[shard_id] == expected:
        self.complete.append(shard_id)
        out.append((shard_id, pa.concat_tables(self.pending.pop(shard_id))))
    return out

  def _break(self, shard_id: str, why: str) -> None:
    log.error("shard %s: %s; not written", shard_id, why)
    self.broken[shard_id] = why
    self.pending.pop(shard_id, None)


def short_error(e: BaseException, limit: int = 500) -> str:
  """`Type: message` with a remote traceback (Ray task errors carry one) reduced to its last line."""
  lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
  text = f"{type(e).__name__}: {lines[-1] if lines else ''}"
  return text if len(text) <= limit else text[:limit - 1] + "…"


def commit_with_retry(sink, shard_id: str, table: pa.Table, stats: dict, attempts: int = 3,
                      backoff_s: float = 2.0, **commit_kwargs) -> str:
  """Sink.commit_shard with retries (object stores have transient errors); a data error is not retried."""
  for attempt in range(attempts):
    try:
      return sink.commit_shard(shard_id, table, stats, **commit_kwargs)
    except (ValueError, TypeError, pa.ArrowInvalid):
      raise
    except Exception as e:  # noqa: BLE001 - I/O of any fsspec backend
      if attempt == attempts - 1:
        raise
      log.warning("commit of %s failed (attempt %d/%d): %r", shard_id, attempt + 1, attempts, e)
      time.sleep(backoff_s * 2 ** attempt)
  raise AssertionError("unreachable")


def pc_min(col) -> float:
  import pyarrow.compute as pc
  v = pc.min(col).as_py()
  return time.time() if v is None else float(v)


def _group_by_shard(table: pa.Table) -> dict[str, pa.Table]:
  shards = table.column("shard").to_pylist()
  idx: dict[str, list[int]] = {}
  for i, s in enumerate(shards):
    idx.setdefault(s, []).append(i)
  if len(idx) == 1:
    return {shards[0]: table}
  return {s: table.take(pa.array(rows, pa.int64())) for s, rows in idx.items()}
