"""Shard commits off the critical path: a bounded pool of commit threads next to the driver's stream.

The driver hands each complete shard to `Committer.submit` and goes back to `iter_batches`; a pool thread runs
`Sink.commit_shard` (data file, then the marker: the commit point) with retries that back off with jitter in
that thread, never in the stream. The stream waits only when `max_pending` shards are already waiting for a
commit (memory bound); that time is measured (`waited_s`). Exactly-once is the sink's: names are
deterministic, each shard is submitted once per run, a shard's marker is written only after its data file, and
commits of different shards touch different objects, so their order does not matter. A process killed with
commits in flight leaves data files without markers, which the next run's `Sink.cleanup` deletes and redoes.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import random
import threading
import time
from typing import Callable, Optional

import pyarrow as pa

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Done:
  """One finished commit: `uri` of the data file, or the `error` that ended its last attempt."""
  shard_id: str
  table: pa.Table
  uri: Optional[str] = None
  error: Optional[BaseException] = None
  seconds: float = 0.0        # submit to done (queueing and retries included)
  attempts: int = 0


def backoff(attempt: int, base_s: float, cap_s: float = 30.0) -> float:
  """Full jitter: uniform in [0, min(cap, base * 2^attempt)]; retries of many shards do not fall in step."""
  return random.uniform(0, min(cap_s, base_s * 2 ** attempt))


def is_data_error(e: BaseException) -> bool:
  """Errors a retry cannot fix (the table does not fit the schema)."""
  return isinstance(e, (ValueError, TypeError, pa.ArrowInvalid))


class Committer:
  """Commits shards through `commit(shard_id, table, stats) -> uri` on `workers` threads (see the module doc)."""

  def __init__(self, commit: Callable[[str, pa.Table, dict], str], workers: int = 8, attempts: int = 4,
               backoff_s: float = 1.0, max_pending: Optional[int] = None):
    self.commit, self.attempts, self.backoff_s = commit, attempts, backoff_s
    self.pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="pgbatch-commit")
    self.slots = threading.BoundedSemaphore(max_pending or 4 * workers)
    self.lock = threading.Lock()
    self.done: list[Done] = []
    self.futures: set = set()
    self.waited_s = 0.0         # time the stream spent blocked in submit
    self.waits = 0

  def submit(self, shard_id: str, table: pa.Table, stats: dict) -> None:
    """Queues the shard's commit; blocks only while `max_pending` commits are pending."""
    if not self.slots.acquire(blocking=False):
      t0 = time.perf_counter()
      self.slots.acquire()
      self.waited_s += time.perf_counter() - t0
      self.waits += 1
    fut = self.pool.submit(self._run, shard_id, table, stats, time.perf_counter())
    with self.lock:
      self.futures.add(fut)
    fut.add_done_callback(self._forget)

  def _forget(self, fut) -> None:
    with self.lock:
      self.futures.discard(fut)

  def _run(self, shard_id: str, table: pa.Table, stats: dict, t_submit: float) -> None:
    out = Done(shard_id, table)
    try:
      for attempt in range(self.attempts):
        out.attempts = attempt + 1
        try:
          out.uri = self.commit(shard_id, table, stats)
          out.error = None
          break
        except Exception as e:  # noqa: BLE001 - I/O of any fsspec backend; data errors are not retried
          out.error = e
          if is_data_error(e) or attempt == self.attempts - 1:
            break
          delay = backoff(attempt, self.backoff_s)
          log.warning("commit of %s failed (attempt %d/%d), retrying in %.1f s: %r", shard_id, attempt + 1,
                      self.attempts, delay, e)
          time.sleep(delay)
    finally:
      out.seconds = time.perf_counter() - t_submit
      with self.lock:
        self.done.append(out)
      self.slots.release()

  def poll(self) -> list[Done]:
    """The commits finished since the last call."""
    with self.lock:
      out, self.done = self.done, []
    return out

  def pending(self) -> int:
    with self.lock:
      return len(self.futures)

  def close(self) -> list[Done]:
    """Waits for every submitted commit; returns those not yet polled."""
    self.pool.shutdown(wait=True)
    return self.poll()
