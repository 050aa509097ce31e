"""Two `pgbatch run` processes on one output: while the first holds the output's lease, the second is refused
at once (exit 2, one line saying who holds it) and writes nothing; the first finishes; every image is in the
output exactly once; `pgbatch inspect --job` confirms it."""
import json
import subprocess
import time

import yaml

from pgbatch import demo
from tests import pipeline_helpers as H


def test_second_concurrent_run_is_refused_and_nothing_is_annotated_twice(tmp_path):
  ckpt, tok = H.tiny_model(tmp_path / "model")
  photos = [s for s in demo.samples() if s[0] != demo.BROKEN_KEY][:4]
  demo.write_shards(tmp_path / "shards", photos, shards=2, prefix="c")
  out = tmp_path / "out"
  spec = H.job("twice", str(tmp_path / "shards" / "*.tar"), str(out) + "/", ckpt, tok, fast_safety=True,
               tasks=[{"name": "caption_en", "kind": "caption", "lang": "en", "max_new_tokens": 2}])
  (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
  first = subprocess.Popen(H.pgbatch_cmd("run", str(tmp_path / "job.yaml"), "--no-progress"), env=H.subprocess_env(),
                           cwd=str(H.ROOT), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.monotonic() + 240
    while not (out / "_lease.json").exists() and first.poll() is None and time.monotonic() < deadline:
      time.sleep(0.05)
    holder = json.loads((out / "_lease.json").read_text())
    second = H.run_cli("run", str(tmp_path / "job.yaml"), "--no-progress")
    stdout, stderr = first.communicate(timeout=600)
  finally:
    if first.poll() is None:
      first.kill()
  assert second.returncode == 2, second.stdout + second.stderr
  assert f"in use by run {holder['run_id']} of job 'twice'" in second.stderr and "--force" in second.stderr
  assert second.stdout == ""
  assert first.returncode == 0, stdout + stderr
  assert "4 images (ok 4, error 0, filtered 0) in 2/2 shards" in stdout
  assert not (out / "_lease.json").exists()       # released at the end
  entries, tables = H.read_output(str(out) + "/")
  keys = [(r["shard"], r["key"]) for t in tables.values() for r in t.to_pylist()]
  assert len(keys) == len(set(keys)) == 4 and len({e["run_id"] for e in entries}) == 1
  report = H.run_cli("inspect", str(out), "--job", str(tmp_path / "job.yaml"), "--json")
  assert report.returncode == 0, report.stderr
  eo = json.loads(report.stdout)["exactly_once"]
  assert eo == {"input": spec["input"]["uri"], "format": "webdataset", "duplicate_keys": [], "missing": [],
                "changed_shards": [], "ok": True}
  text = H.run_cli("inspect", str(out), "--job", str(tmp_path / "job.yaml")).stdout
  assert "exactly once: yes" in text
