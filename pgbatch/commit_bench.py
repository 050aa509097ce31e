"""`pgbatch bench --commits`: shard commits against a loopback GCS emulator behind a proxy adding a fixed
latency to every request (object-store round trips), serial (today's inline commit: the stream waits for each)
versus a `Committer` pool; prints JSON: shards/s committed, requests per commit, commit latency, and how long
the stream (a producer at `--rate` shards/s) was blocked.

Needs the `gcp-storage-emulator` package (test extra). `LatencyProxy` is also what the tests use to hold up
chosen commits.
"""
from __future__ import annotations

import contextlib
import http.client
import http.server
import json
import os
import re
import statistics
import threading
import time
from typing import Iterator, Optional

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}


class LatencyProxy:
  """HTTP proxy on 127.0.0.1: each request waits `latency_s`, then goes to `upstream` (host:port). Requests whose
  path+query matches a pattern in `held` wait until `release(pattern)`."""

  def __init__(self, upstream: str, latency_s: float):
    self.upstream, self.latency_s = upstream, latency_s
    self.held: dict[str, threading.Event] = {}
    self.requests = 0
    self.lock = threading.Lock()
    proxy = self

    class Handler(http.server.BaseHTTPRequestHandler):
      protocol_version = "HTTP/1.1"

      def log_message(self, *a):
        pass

      def _forward(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        with proxy.lock:
          proxy.requests += 1
          gates = [ev for pat, ev in proxy.held.items() if re.search(pat, self.path)]
        time.sleep(proxy.latency_s)
        for ev in gates:
          ev.wait()
        conn = http.client.HTTPConnection(proxy.upstream, timeout=120)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        conn.request(self.command, self.path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        self.send_response(resp.status, resp.reason)
        for k, v in resp.getheaders():
          if k.lower() not in HOP_BY_HOP and k.lower() != "content-length":
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        try:
          if self.command != "HEAD":
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):   # the client gave up on this request
          self.close_connection = True
        conn.close()

      do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _forward

    self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.server.daemon_threads = True
    threading.Thread(target=self.server.serve_forever, name="latency-proxy", daemon=True).start()
    self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"

  def hold(self, pattern: str) -> None:
    with self.lock:
      self.held[pattern] = threading.Event()

  def release(self, pattern: str) -> None:
    with self.lock:
      ev = self.held.pop(pattern)
    ev.set()

  def close(self) -> None:
    for pat in list(self.held):
      self.release(pat)
    self.server.shutdown()
    self.server.server_close()


@contextlib.contextmanager
def slow_gcs(latency_s: float, bucket: str = "pgbatch-bench") -> Iterator[tuple[object, str, LatencyProxy]]:
  """(gcsfs filesystem, bucket, proxy): an in-memory GCS emulator on loopback reached through a LatencyProxy;
  `STORAGE_EMULATOR_HOST` points at the proxy meanwhile (gs:// URLs opened by fsspec go through it)."""
  import socket
  from gcp_storage_emulator.server import create_server
  os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"
  import fsspec
  import gcsfs
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  server = create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket)
  server.start()
  proxy = LatencyProxy(f"127.0.0.1:{port}", latency_s)
  saved = os.environ.get("STORAGE_EMULATOR_HOST")
  os.environ["STORAGE_EMULATOR_HOST"] = proxy.endpoint
  gcsfs.GCSFileSystem.clear_instance_cache()
  fsspec.AbstractFileSystem.clear_instance_cache()
  try:
    yield gcsfs.GCSFileSystem(endpoint_url=proxy.endpoint, token="anon", project="bench"), bucket, proxy
  finally:
    if saved is None:
      os.environ.pop("STORAGE_EMULATOR_HOST", None)
    else:
      os.environ["STORAGE_EMULATOR_HOST"] = saved
    gcsfs.GCSFileSystem.clear_instance_cache()
    proxy.close()
    server.stop()


def shard_table(i: int, rows: int):
  """A committed-shard-like table: `rows` ok rows with a caption (the output contract of a caption job)."""
  import pyarrow as pa
  from pgbatch import schema, tasks
  task = tasks.make_task({"name": "caption_en", "kind": "caption", "lang": "en"})
  out = schema.output_schema([task])
  shard = f"gs://photos/nightly/shard-{i:05d}.tar"
  cols = {"key": [f"{k:06d}" for k in range(rows)], "shard": [shard] * rows, "status": ["ok"] * rows,
          "source_uri": [f"{shard}#{k:06d}.jpg" for k in range(rows)],
          "sha256": [f"{(i * rows + k):064x}" for k in range(rows)], "width": [640] * rows, "height": [480] * rows,
          "caption_en": [{"text": f"a photo number {k} of a street with cars", "prompt": "caption en",
                          "num_tokens": 12, "truncated": False} for k in range(rows)]}
  return pa.table({f.name: pa.array(cols.get(f.name, [None] * rows), f.type) for f in out}, schema=out), shard


def run_one(fs, bucket: str, proxy: LatencyProxy, shards: int, rows: int, workers: int, rate: float) -> dict:
  """Commits `shards` shards produced at `rate` shards/s; workers=0: inline (the stream commits each itself)."""
  from pgbatch.commits import Committer
  from pgbatch.io.sink import Sink
  prefix = f"gs://{bucket}/w{workers}-{time.time_ns()}/"
  sink = Sink(prefix, None)
  tables = [shard_table(i, rows) for i in range(shards)]
  before = proxy.requests
  committer = Committer(sink.commit_shard, workers=workers, max_pending=2 * workers) if workers else None
  latencies, waited, t0 = [], 0.0, time.perf_counter()
  for i, (table, shard) in enumerate(tables):
    due = t0 + i / rate
    if time.perf_counter() < due:
      time.sleep(due - time.perf_counter())
    if committer is None:
      t = time.perf_counter()
      sink.commit_shard(shard, table, {})
      latencies.append(time.perf_counter() - t)
      waited += time.perf_counter() - t
    else:
      committer.submit(shard, table, {})
  if committer is not None:
    done = committer.close()
    assert all(d.error is None for d in done), [d.error for d in done if d.error]
    latencies, waited = [d.seconds for d in done], committer.waited_s
  elapsed = time.perf_counter() - t0
  assert len(sink.committed()) == shards
  lat = sorted(latencies)
  return {"workers": workers, "shards": shards, "rows_per_shard": rows, "offered_shards_per_s": rate,
          "committed_shards_per_s": round(shards / elapsed, 2), "seconds": round(elapsed, 2),
          "requests_per_commit": round((proxy.requests - before) / shards, 2),
          "commit_s_p50": round(statistics.median(lat), 3), "commit_s_p95": round(lat[int(0.95 * (len(lat) - 1))], 3),
          "stream_waited_s": round(waited, 2), "stream_waited": waited > 0}


def bench(shards: int = 40, rows: int = 1000, latency_ms: float = 80.0, workers: tuple[int, ...] = (0, 4, 16),
          rate: float = 5.0) -> dict:
  with slow_gcs(latency_ms / 1000) as (fs, bucket, proxy):
    results = [run_one(fs, bucket, proxy, shards, rows, w, rate) for w in workers]
  return {"latency_ms_per_request": latency_ms, "results": results}


def main(args) -> int:
  workers = tuple(int(w) for w in str(args.commit_workers).split(","))
  out = bench(shards=args.shards, rows=args.rows_per_shard, latency_ms=args.latency_ms, workers=workers,
              rate=args.rate)
  print(json.dumps(out, indent=1))
  return 0


def add_args(parser) -> None:
  parser.add_argument("--commits", action="store_true",
                      help="time shard commits against a loopback GCS emulator behind a latency proxy")
  parser.add_argument("--shards", type=int, default=40, help="--commits: shards to commit")
  parser.add_argument("--rows-per-shard", type=int, default=1000, help="--commits: rows per shard")
  parser.add_argument("--latency-ms", type=float, default=80.0, help="--commits: added latency per request")
  parser.add_argument("--commit-workers", default="0,4,16",
                      help="--commits: pool sizes to compare; 0 = inline commits (the stream waits for each)")
  parser.add_argument("--rate", type=float, default=5.0,
                      help="--commits: shards/s the stream produces (5 = 8 hosts x 625 img/s, 1000-image shards)")
