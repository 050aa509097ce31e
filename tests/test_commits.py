"""Commits off the critical path (pgbatch.commits): against the GCS emulator behind the latency proxy, a commit
held up does not stop the others; retries back off with jitter and data errors are not retried."""
from __future__ import annotations

import time

import pyarrow as pa
import pytest

from pgbatch import commit_bench, commits
from pgbatch.io import sink


@pytest.fixture(scope="module")
def slow():
  with commit_bench.slow_gcs(0.02) as fs_bucket_proxy:
    yield fs_bucket_proxy


def wait_for(cond, timeout_s: float = 60.0) -> None:
  end = time.time() + timeout_s
  while not cond():
    assert time.time() < end, "timed out"
    time.sleep(0.1)


def test_a_held_commit_does_not_stop_the_others(slow):
  fs, bucket, proxy = slow
  out = sink.Sink(f"gs://{bucket}/held/", None)
  tables = [commit_bench.shard_table(i, 20) for i in range(4)]
  held = sink.output_name(tables[0][1])[:-len(".parquet")]
  proxy.hold(held)                                  # every request naming shard 0's objects waits
  committer = commits.Committer(out.commit_shard, workers=4)
  t0 = time.perf_counter()
  for table, shard in tables:
    committer.submit(shard, table, {})
  assert time.perf_counter() - t0 < 1.0 and committer.waited_s == 0    # the stream never waited
  wait_for(lambda: set(out.committed()) == {s for _, s in tables[1:]})
  assert committer.pending() == 1 and tables[0][1] not in out.committed()
  proxy.release(held)
  done = committer.close()
  assert set(out.committed()) == {s for _, s in tables}
  assert all(d.error is None for d in done) and {d.shard_id for d in done} == {s for _, s in tables}


def test_retries_back_off_with_jitter_and_data_errors_are_not_retried():
  calls = []

  def flaky(shard_id, table, stats):
    calls.append(shard_id)
    if shard_id == "bad":
      raise ValueError("column does not fit")
    if calls.count(shard_id) < 3:
      raise OSError("503 from the object store")
    return f"gs://b/{shard_id}"
  c = commits.Committer(flaky, workers=2, attempts=4, backoff_s=0.01)
  for s in ("a", "b", "bad"):
    c.submit(s, pa.table({"x": [1]}), {})
  done = {d.shard_id: d for d in c.close()}
  assert done["a"].uri == "gs://b/a" and done["a"].attempts == 3 and done["b"].attempts == 3
  assert isinstance(done["bad"].error, ValueError) and done["bad"].attempts == 1
  delays = [commits.backoff(2, 1.0) for _ in range(200)]
  assert all(0 <= d <= 4.0 for d in delays) and len(set(delays)) > 100    # full jitter, not a fixed 2 s, 4 s
