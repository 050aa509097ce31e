"""The output lease (one run at a time per output, heartbeat, stale takeover, --force) and the write probe, on
local disk and on the GCS emulator."""
import json
import os
import socket
import subprocess
import sys
import time

import fsspec
import pytest

from pgbatch import errors
from pgbatch.io import lease, sink


def _holders(fs, root):
  return lease.Lease(fs, root, "reader", "j").read()


@pytest.fixture(params=["local", "gcs"])
def where(request, tmp_path):
  if request.param == "local":
    return fsspec.filesystem("file"), str(tmp_path / "out")
  fs, bucket = request.getfixturevalue("gcs")
  return fs, f"{bucket}/lease-{time.monotonic_ns()}"


def test_second_run_is_refused_while_the_first_holds_the_output(where):
  fs, root = where
  fs.makedirs(root, exist_ok=True)
  with lease.hold(fs, root, "run-1", "nightly", ttl_s=60) as first:
    with pytest.raises(lease.LeaseHeld, match=r"in use by run run-1 of job 'nightly' on .*--force"):
      lease.Lease(fs, root, "run-2", "nightly").acquire()
    first.check()
    assert _holders(fs, root)["run_id"] == "run-1"
  assert _holders(fs, root) is None   # released


def test_stale_lease_is_taken_over_and_force_takes_a_live_one(where):
  fs, root = where
  fs.makedirs(root, exist_ok=True)
  dead = {"run_id": "old", "job": "j", "host": "elsewhere", "pid": 1, "heartbeat": time.time() - 600, "ttl_s": 120}
  fs.pipe_file(f"{root}/{lease.LEASE_NAME}", json.dumps(dead).encode())
  with lease.hold(fs, root, "new", "j", ttl_s=3600) as held:   # no timed heartbeats: beat() by hand
    first = _holders(fs, root)
    assert first["run_id"] == "new"
    assert held.beat() and _holders(fs, root)["heartbeat"] >= first["heartbeat"]
    with pytest.raises(lease.LeaseHeld):
      lease.Lease(fs, root, "third", "j").acquire()
    thief = lease.Lease(fs, root, "forced", "j", ttl_s=3600)
    thief.acquire(force=True)
    assert not held.beat()                 # the holder's next heartbeat sees the lease taken
    with pytest.raises(lease.LeaseLost, match="forced"):
      held.check()
  assert _holders(fs, root)["run_id"] == "forced"   # a lost lease is not deleted by its former holder
  thief.release()
  assert _holders(fs, root) is None


def test_lease_of_a_killed_process_on_this_host_is_stale_at_once(tmp_path):
  fs, root = fsspec.filesystem("file"), str(tmp_path)
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()
  fs.pipe_file(f"{root}/{lease.LEASE_NAME}", json.dumps(
      {"run_id": "killed", "job": "j", "host": socket.gethostname(), "pid": proc.pid, "heartbeat": time.time(),
       "ttl_s": 120}).encode())
  with lease.hold(fs, root, "rerun", "j"):
    assert _holders(fs, root)["run_id"] == "rerun"


def test_probe_finds_an_unwritable_output_before_any_work(tmp_path, gcs):
  ok = tmp_path / "ok"
  sink.Sink(str(ok), None).probe_writable()
  assert os.listdir(ok) == []                      # the probe object is deleted again
  (tmp_path / "a-file").write_text("x")
  with pytest.raises(errors.OutputError, match=r"output.uri: cannot write to .*a-file/out"):
    sink.Sink(str(tmp_path / "a-file" / "out"), None).probe_writable()
  with pytest.raises(errors.OutputError, match=r"output.uri: cannot write to gs://no-such-bucket-x/out"):
    sink.Sink("gs://no-such-bucket-x/out", None).probe_writable()
