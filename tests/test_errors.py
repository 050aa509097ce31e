"""Every user-facing failure is one line naming the field or file, with the documented exit status
(pgbatch.errors: 2 spec/input/output/model, 1 partial, 130 Ctrl-C after a clean stop); `--debug` adds the
traceback. Each case used to print a raw traceback."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time

import yaml

from pgbatch import cli, demo, errors
from pgbatch.io import listing
from tests import pipeline_helpers as H


def write_job(path, **tree) -> str:
  path.write_text(yaml.safe_dump(tree))
  return str(path)


def one_line(err: str) -> str:
  lines = [x for x in err.splitlines() if x.strip()]
  assert len(lines) == 1 and "Traceback" not in err, err
  return lines[0]


def test_output_uri_that_is_a_file(tmp_path, capsys):
  (tmp_path / "in").mkdir()
  (tmp_path / "in" / "s.tar").write_bytes(b"")
  (tmp_path / "taken").write_text("a file")
  job = write_job(tmp_path / "job.yaml", **H.job("j", str(tmp_path / "in" / "*.tar"), str(tmp_path / "taken"),
                                                 "/m.npz", "/t.model"))
  assert cli.main(["run", job, "--no-progress"]) == errors.BAD_INPUT
  line = one_line(capsys.readouterr().err)
  assert line.startswith("pgbatch run: j: output.uri: ") and "taken is a file; expected a folder" in line
  job = write_job(tmp_path / "job2.yaml", **H.job("j", str(tmp_path / "in" / "*.tar"),
                                                  str(tmp_path / "taken" / "sub") + "/", "/m.npz", "/t.model"))
  assert cli.main(["run", job, "--no-progress"]) == errors.BAD_INPUT
  assert "lies under the file" in one_line(capsys.readouterr().err)
  # --debug: the same line, and the traceback
  assert cli.main(["run", job, "--no-progress", "--debug"]) == errors.BAD_INPUT
  err = capsys.readouterr().err
  assert "pgbatch run: j: output.uri: " in err and "Traceback" in err and "OutputError" in err
  assert not (tmp_path / "out").exists()


def test_tokenizer_path_that_is_a_folder(tmp_path, capsys):
  ckpt, _ = H.tiny_model(tmp_path / "model")
  (tmp_path / "in").mkdir()
  (tmp_path / "in" / "s.tar").write_bytes(b"")
  (tmp_path / "tokdir").mkdir()
  job = write_job(tmp_path / "job.yaml", **H.job("j", str(tmp_path / "in" / "*.tar"), str(tmp_path / "out"),
                                                 ckpt, str(tmp_path / "tokdir")))
  assert cli.main(["run", job, "--no-progress"]) == errors.BAD_INPUT
  line = one_line(capsys.readouterr().err)
  assert line.startswith("pgbatch run: j: cannot load the model: model.tokenizer: ") and "is a folder" in line


def _closed_port() -> int:
  s = socket.socket()
  s.bind(("127.0.0.1", 0))
  port = s.getsockname()[1]
  s.close()
  return port


def test_validate_inputs_against_an_unreachable_bucket(tmp_path):
  tree = H.job("j", "gs://nobody-bucket/shards/*.tar", "gs://nobody-bucket/out/", "/m.npz", "/t.model")
  tree["input"]["storage_options"] = {"endpoint_url": f"http://127.0.0.1:{_closed_port()}", "token": "anon"}
  job = write_job(tmp_path / "job.yaml", **tree)
  p = H.run_cli("validate", job, "--inputs", "--spec-only", "--timeout", "3", timeout=120)  # model: placeholders
  assert p.returncode == errors.BAD_INPUT, p.stderr
  line = one_line(p.stderr)
  assert line.startswith(f"{job}: input.uri: cannot list gs://nobody-bucket/shards/*.tar: "), line


def test_ctrl_c_stops_a_run_cleanly(tmp_path):
  """SIGINT to the whole process group (what a terminal's Ctrl-C does) while the run is under way (Ray up, the
  plan executing): the run stops, Ray goes down, one line, exit 130; whatever was committed stays committed."""
  import threading
  ckpt, tok = H.tiny_model(tmp_path / "model")
  photos = demo.samples()[:2]
  demo.write_shards(tmp_path / "shards", photos * 8, shards=8, prefix="s")
  out = tmp_path / "out"
  job = write_job(tmp_path / "job.yaml", **H.job("ctrlc", str(tmp_path / "shards" / "*.tar"), str(out) + "/",
                                                 ckpt, tok, fast_safety=True, batch_size=2))
  p = subprocess.Popen(H.pgbatch_cmd("run", job, "--no-progress", "-v"), env=H.subprocess_env(), cwd=str(H.ROOT),
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
  lines: list[str] = []
  ready = threading.Event()

  def read_stderr():
    for line in p.stderr:
      lines.append(line)
      if "ray ready" in line:
        ready.set()
  reader = threading.Thread(target=read_stderr, daemon=True)
  reader.start()
  try:
    assert ready.wait(540), "".join(lines)
    os.killpg(p.pid, signal.SIGINT)
    stdout = p.stdout.read()
    p.wait(timeout=120)
    reader.join(timeout=30)
  finally:
    if p.poll() is None:
      os.killpg(p.pid, signal.SIGKILL)
  stderr = "".join(lines)
  assert p.returncode == errors.INTERRUPTED, (p.returncode, stdout, stderr)
  assert "Traceback" not in stderr, stderr
  assert stderr.strip().splitlines()[-1].startswith("pgbatch run: interrupted"), stderr
  from pgbatch.io import sink
  entries = sink.read_manifest(str(out)) if (out / "_manifest").exists() else []
  assert len(entries) < 8 and all(os.path.exists(e["file"]) for e in entries), json.dumps(entries)


def test_check_output_on_an_object_store(gcs):
  fs, bucket = gcs
  fs.pipe(f"{bucket}/errors/taken", b"a file")
  listing.check_output(f"gs://{bucket}/errors/new-folder/")  # missing folders are fine: the sink makes them
  fs.pipe(f"{bucket}/errors/existing/x.parquet", b"x")
  listing.check_output(f"gs://{bucket}/errors/existing/")
  for uri, what in ((f"gs://{bucket}/errors/taken", "is a file"), (f"gs://{bucket}/errors/taken/sub/", "lies under")):
    try:
      listing.check_output(uri)
    except errors.OutputError as e:
      assert str(e).startswith(f"output.uri: {uri}") and what in str(e), str(e)
    else:
      raise AssertionError(f"{uri} accepted")
