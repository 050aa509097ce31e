"""One run at a time per output: a lease object `<output>/_lease.json` with a heartbeat.

    with lease.hold(fs, root, run_id, job, force=False) as held:   # LeaseHeld when another live run has it
      ...; held.check()                                             # LeaseLost when another run took it over

The holder rewrites the lease every `ttl_s / 4` seconds. A lease whose heartbeat is older than `ttl_s` is stale
(its run died without releasing it) and is taken over with a warning; a live one only with `force`. Taking the
lease writes, re-reads and compares it, so two runs racing for a free output cannot both believe they hold it
(on stores without conditional writes this is best effort: the later writer wins and the other sees LeaseLost
at its next check, before any commit).
"""
from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import posixpath
import socket
import threading
import time
from typing import Iterator, Optional

log = logging.getLogger(__name__)

LEASE_NAME = "_lease.json"
TTL_S = 120.0


class LeaseHeld(RuntimeError):
  """Another live run holds the output."""


class LeaseLost(RuntimeError):
  """Another run took the lease over while this run held it (it was forced, or this run's heartbeat stalled)."""


class Lease:
  def __init__(self, fs, root: str, run_id: str, job: str, ttl_s: float = TTL_S):
    self.fs, self.path, self.run_id, self.job, self.ttl_s = fs, posixpath.join(root, LEASE_NAME), run_id, job, ttl_s
    self.lost: Optional[str] = None
    self._stop = threading.Event()
    self._thread: Optional[threading.Thread] = None

  def _body(self) -> bytes:
    return json.dumps({"run_id": self.run_id, "job": self.job, "host": socket.gethostname(), "pid": os.getpid(),
                       "heartbeat": time.time(), "ttl_s": self.ttl_s,
                       "heartbeat_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")},
                      sort_keys=True).encode()

  def read(self) -> Optional[dict]:
    """The current lease, or None when there is none (or it cannot be parsed: a torn write)."""
    try:
      self.fs.invalidate_cache(posixpath.dirname(self.path))
      return json.loads(self.fs.cat_file(self.path))
    except FileNotFoundError:
      return None
    except ValueError:
      return None

  def acquire(self, force: bool = False) -> None:
    cur = self.read()
    if cur is not None and cur.get("run_id") != self.run_id:
      age = time.time() - float(cur.get("heartbeat", 0))
      who = (f"run {cur.get('run_id')} of job {cur.get('job')!r} on {cur.get('host')} (pid {cur.get('pid')}), "
             f"last heartbeat {age:.0f} s ago")
      if age < float(cur.get("ttl_s", self.ttl_s)) and not force and not _dead_here(cur):
        raise LeaseHeld(f"output is in use by {who}; wait for that run to finish, or pass --force if it is dead")
      log.warning("taking over the output lease from %s (%s)", who, "--force" if force else "stale")
    self.fs.pipe_file(self.path, self._body())
    time.sleep(0.2)   # a racing writer's object lands before the re-read
    now = self.read()
    if now is None or now.get("run_id") != self.run_id:
      raise LeaseHeld(f"output was taken by run {(now or {}).get('run_id')} at the same moment; try again")
    self._thread = threading.Thread(target=self._beat, name="pgbatch-lease", daemon=True)
    self._thread.start()

  def _beat(self) -> None:
    while not self._stop.wait(self.ttl_s / 4) and self.beat():
      pass

  def beat(self) -> bool:
    """One heartbeat: rewrites the lease unless another run holds it now (then `lost` is set). Returns whether
    this run still holds the lease."""
    try:
      cur = self.read()
      if cur is not None and cur.get("run_id") != self.run_id:
        self.lost = f"run {cur.get('run_id')} on {cur.get('host')} took the output lease over"
        log.error("%s; this run commits nothing more", self.lost)
        return False
      self.fs.pipe_file(self.path, self._body())
    except Exception as e:  # noqa: BLE001 - a missed heartbeat is retried; the ttl allows several
      log.warning("lease heartbeat failed: %r", e)
    return True

  def check(self) -> None:
    """Raises LeaseLost when another run holds the output now (call before each commit)."""
    if self.lost:
      raise LeaseLost(self.lost)

  def release(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=10)
    if self.lost:
      return
    cur = self.read()
    if cur is not None and cur.get("run_id") == self.run_id:
      try:
        self.fs.rm_file(self.path)
      except FileNotFoundError:
        pass


def _dead_here(lease: dict) -> bool:
  """The lease's run was on this host and its process is gone (killed: it never released the lease)."""
  if lease.get("host") != socket.gethostname() or not isinstance(lease.get("pid"), int):
    return False
  try:
    os.kill(lease["pid"], 0)
  except ProcessLookupError:
    return True
  except OSError:
    return False
  return False


@contextlib.contextmanager
def hold(fs, root: str, run_id: str, job: str, force: bool = False, ttl_s: float = TTL_S) -> Iterator[Lease]:
  lease = Lease(fs, root, run_id, job, ttl_s)
  lease.acquire(force)
  try:
    yield lease
  finally:
    lease.release()
