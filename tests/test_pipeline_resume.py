"""Kill and resume: `pgbatch run` in a subprocess is SIGKILLed after it committed at least one shard (and
before all), the leftovers of a kill between data file and marker are planted, then the same command is
rerun: every input image is in the output exactly once and no temporary or unmarked file is left."""
import json
import os
import signal
import subprocess
import time

import pytest
import yaml

from pgbatch import demo
from pgbatch.io import sink
from tests import pipeline_helpers as H

SHARDS = 16
PER_SHARD = 1


def _committed(out) -> dict:
  return sink.Sink(str(out) + "/", None).committed()


def _kill_group(proc: subprocess.Popen) -> None:
  """Ends what the killed driver left in its session (local Ray processes started by it)."""
  try:
    os.killpg(proc.pid, signal.SIGKILL)
  except ProcessLookupError:
    pass


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("resume")
  ckpt, tok = H.tiny_model(tmp / "model")
  photos = [s for s in demo.samples() if s[0] != demo.BROKEN_KEY]
  rows = [(f"{photos[i % len(photos)][0]}-{i:03d}", *photos[i % len(photos)][1:]) for i in range(SHARDS * PER_SHARD)]
  demo.write_shards(tmp / "shards", rows, shards=SHARDS, prefix="s")
  out = tmp / "out"
  spec = H.job("resume", str(tmp / "shards" / "*.tar"), str(out) + "/", ckpt, tok, fast_safety=True, batch_size=2,
               tasks=[{"name": "caption_en", "kind": "caption", "lang": "en", "max_new_tokens": 16}])
  (tmp / "job.yaml").write_text(yaml.safe_dump(spec))
  proc = subprocess.Popen(H.pgbatch_cmd("run", str(tmp / "job.yaml"), "--no-progress"), env=H.subprocess_env(),
                          cwd=str(H.ROOT), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
  deadline = time.monotonic() + 240
  try:
    while time.monotonic() < deadline and proc.poll() is None:
      if (out / "_manifest").is_dir() and any(p.suffix == ".json" for p in (out / "_manifest").iterdir()):
        break
      time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)   # the driver: no cleanup, no atexit
    proc.wait(timeout=30)
  finally:
    _kill_group(proc)
  log = proc.stdout.read().decode(errors="replace")
  proc.stdout.close()
  at_kill = _committed(out)
  # plant what a kill between the data upload and the marker leaves: a data file without a marker (with
  # garbage content), plus a temporary file
  shard_ids = sorted(str(p) for p in (tmp / "shards").glob("*.tar"))
  missing = [s for s in shard_ids if s not in at_kill]
  planted = []
  if missing:
    planted.append(out / sink.output_name(missing[0]))
    planted[0].write_bytes(b"PAR1 not really parquet")
  (out / "_tmp").mkdir(exist_ok=True)
  (out / "_tmp" / "x.parquet.0123.tmp").write_bytes(b"partial")
  rerun = H.run_cli("run", str(tmp / "job.yaml"), "--no-progress")
  entries, tables = H.read_output(str(out))
  yield dict(log=log, returncode=proc.returncode, at_kill=at_kill, shard_ids=shard_ids, rows=rows, rerun=rerun,
             entries=entries, tables=tables, out=out, planted=planted)


def test_killed_mid_way(resumed):
  assert resumed["returncode"] == -signal.SIGKILL, resumed["log"][-3000:]
  assert 1 <= len(resumed["at_kill"]) < SHARDS, (len(resumed["at_kill"]), resumed["log"][-3000:])


def test_rerun_finishes_only_the_rest(resumed):
  r = resumed["rerun"]
  assert r.returncode == 0, r.stdout + r.stderr
  done = len(resumed["at_kill"])
  assert f"in {SHARDS - done}/{SHARDS} shards, {done} already done" in r.stdout, r.stdout
  # committed shards were not rewritten: same entries (run id, commit time) as at the kill
  now = {e["shard"]: e for e in resumed["entries"]}
  for shard, e in resumed["at_kill"].items():
    assert now[shard]["run_id"] == e["run_id"] and now[shard]["committed_at"] == e["committed_at"]
  assert len({e["run_id"] for e in resumed["entries"]}) == 2


def test_every_input_exactly_once(resumed):
  assert sorted(e["shard"] for e in resumed["entries"]) == resumed["shard_ids"]
  seen = {}
  for t in resumed["tables"].values():
    for shard, key, status in zip(t.column("shard").to_pylist(), t.column("key").to_pylist(),
                                  t.column("status").to_pylist()):
      assert (shard, key) not in seen, f"{shard}#{key} twice"
      seen[(shard, key)] = status
  want = {(resumed["shard_ids"][i * SHARDS // len(resumed["rows"])], row[0]) for i, row in enumerate(resumed["rows"])}
  assert set(seen) == want
  assert set(seen.values()) == {"ok"}


def test_no_stray_files(resumed):
  out = resumed["out"]
  names = sorted(p.name for p in out.iterdir())
  assert names == sorted(["_manifest"] + [e["name"] for e in resumed["entries"]]), names
  assert sorted(p.name for p in (out / "_manifest").iterdir()) == sorted(
      e["name"][:-len(".parquet")] + ".json" for e in resumed["entries"])
  assert sink.Sink(str(out) + "/", None).cleanup() == []
  for p in resumed["planted"]:  # the unmarked data file was replaced by the real one
    assert p.read_bytes()[:4] == b"PAR1" and p.stat().st_size > 100
  assert all(json.loads((out / "_manifest" / n).read_text())["rows"] == PER_SHARD
             for n in os.listdir(out / "_manifest"))
