"""`pgbatch submit` / `pgbatch status`: staging, runtime env, entrypoint and CLI wiring, then for real against a
Ray head started here (`ray start --head` on loopback with its dashboard): a tiny job runs through the Job
Submission API and its Parquet appears; a job that fails on the cluster is reported as failed."""
import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest
import yaml

from pgbatch import cli, submit
from tests import pipeline_helpers as H


@pytest.fixture
def job_dir(tmp_path):
  (tmp_path / "assets").mkdir()
  (tmp_path / "assets" / "tok.model").write_bytes(b"sp")
  (tmp_path / "shards").mkdir()
  for i in range(2):
    (tmp_path / "shards" / f"s{i}.tar").write_bytes(b"t")
  (tmp_path / "unrelated.bin").write_bytes(b"x" * 10)
  spec = {
      "name": "caps",
      "input": {"uri": "shards/*.tar"},
      "model": {"variant": "tiny-pg2", "checkpoint": "gs://bucket/ckpt.npz", "tokenizer": "./assets/tok.model"},
      "output": {"uri": "/abs/out"},
      "tasks": [{"name": "caption_en", "kind": "caption", "lang": "en"}],
  }
  (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
  return tmp_path


def test_stage_copies_only_referenced_files(job_dir, tmp_path_factory):
  dest = tmp_path_factory.mktemp("wd")
  uploads = submit.stage_working_dir(job_dir / "job.yaml", dest)
  assert [(u.field, u.dest) for u in uploads] == [
      ("input.uri", "files/shards/s0.tar"), ("input.uri", "files/shards/s1.tar"),
      ("model.tokenizer", "files/assets/tok.model")]
  staged = yaml.safe_load((dest / "job.yaml").read_text())
  assert staged["input"]["uri"] == "files/shards/*.tar"
  assert sorted(p.name for p in dest.glob(staged["input"]["uri"])) == ["s0.tar", "s1.tar"]
  assert (dest / staged["model"]["tokenizer"]).read_bytes() == b"sp"
  # URLs, absolute paths and plain words are untouched; unreferenced files stay home.
  assert staged["model"]["checkpoint"] == "gs://bucket/ckpt.npz"
  assert staged["output"]["uri"] == "/abs/out" and staged["tasks"][0]["name"] == "caption_en"
  assert not list(dest.rglob("unrelated.bin"))


def test_dry_run_lists_exactly_the_named_files(tmp_path, capsys, monkeypatch):
  """A job folder with a .env, hidden files, a symlink to a file outside, a folder named like a task and a
  relative output: only the files the spec's path fields name are listed; the relative output is refused."""
  job = tmp_path / "job"
  (job / "shards" / ".cache").mkdir(parents=True)
  (job / "shards" / "a.tar").write_bytes(b"t")
  (job / "shards" / ".hidden.tar").write_bytes(b"h")
  (job / "shards" / ".cache" / "b.tar").write_bytes(b"c")
  (tmp_path / "outside.tar").write_bytes(b"o")
  os.symlink(tmp_path / "outside.tar", job / "shards" / "link.tar")
  (job / ".env").write_text("GOOGLE_APPLICATION_CREDENTIALS=/keys/sa.json\n")
  (job / "caption_en").mkdir()  # a folder named like a task: the task keeps its name
  (job / "caption_en" / "x.txt").write_text("x")
  (job / "model").mkdir()
  (job / "model" / "tok.model").write_bytes(b"sp")
  (job / "model" / "ckpt.npz.part00").write_bytes(b"0")
  (job / "model" / "ckpt.npz.part01").write_bytes(b"1")
  (job / "model" / "notes.md").write_text("n")
  spec = {"name": "caps", "input": {"uri": "shards/*.tar"}, "output": {"uri": "out/"},
          "model": {"variant": "tiny-pg2", "checkpoint": "model/ckpt.npz", "tokenizer": "model/tok.model"},
          "tasks": [{"name": "caption_en", "kind": "caption", "lang": "en"}]}
  (job / "job.yaml").write_text(yaml.safe_dump(spec))
  monkeypatch.delenv("PGBATCH__OUTPUT__URI", raising=False)
  assert cli.main(["submit", str(job / "job.yaml"), "--dry-run"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("pgbatch submit: ") and "output.uri: 'out/' is a relative path" in err
  assert len(err.strip().splitlines()) == 1
  out_dir = str(tmp_path / "shared" / "out") + "/"
  assert cli.main(["submit", str(job / "job.yaml"), "--dry-run", "--env", "image", "--set",
                   f"output.uri={out_dir}"]) == 0
  out, err = capsys.readouterr()
  listed = [line.split("\t")[:2] for line in out.splitlines()]
  assert listed == [["job.yaml", "(the spec, with the overrides)"],
                    ["files/shards/a.tar", str(job / "shards" / "a.tar")],
                    ["files/model/ckpt.npz.part00", str(job / "model" / "ckpt.npz.part00")],
                    ["files/model/ckpt.npz.part01", str(job / "model" / "ckpt.npz.part01")],
                    ["files/model/tok.model", str(job / "model" / "tok.model")]], out
  assert "link.tar" in err and "outside" in err and ".env" not in out + err
  # the staged spec: the task untouched, overrides baked in, paths rewritten to the copies
  dest = tmp_path / "wd"
  submit.stage_working_dir(job / "job.yaml", dest, [f"output.uri={out_dir}"])
  staged = yaml.safe_load((dest / "job.yaml").read_text())
  assert staged["tasks"] == spec["tasks"] and staged["name"] == "caps" and staged["output"]["uri"] == out_dir
  assert staged["model"]["checkpoint"] == "files/model/ckpt.npz" and staged["input"]["uri"] == "files/shards/*.tar"
  shipped = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
  assert shipped == ["files/model/ckpt.npz.part00", "files/model/ckpt.npz.part01", "files/model/tok.model",
                     "files/shards/a.tar", "job.yaml"]
  assert not (dest / "files" / "shards" / "link.tar").exists()


def test_pinned_requirements_exclude_ray_and_extras():
  pins = submit.pinned_requirements()
  names = [p.split("==")[0].lower() for p in pins]
  assert "ray" not in names and "pytest" not in names and "torch" not in names
  assert "jax" in names and all("==" in p for p in pins)


def test_runtime_env_modes(tmp_path):
  wd = tmp_path / "wd"
  wd.mkdir()
  assert submit.runtime_env("image", str(wd)) == {"working_dir": str(wd), "env_vars": {}}
  local = submit.runtime_env("local", str(wd))
  assert local["py_modules"] == [str(submit.package_dir())] and (submit.package_dir() / "submit.py").exists()
  with pytest.raises(ValueError):
    submit.runtime_env("conda", str(wd))


def test_runtime_env_pip_ships_wheel(tmp_path):
  wd = tmp_path / "wd"
  wd.mkdir()
  env = submit.runtime_env("pip", str(wd), str(tmp_path / "wheel"))
  wheel_ref = env["pip"]["packages"][-1]
  assert wheel_ref.startswith("${RAY_RUNTIME_ENV_CREATE_WORKING_DIR}/wheels/")
  wheel = wd / wheel_ref.split("}/", 1)[1]
  with zipfile.ZipFile(wheel) as z:
    assert "pgbatch/submit.py" in z.namelist() and "pgbatch/placement.py" in z.namelist()
  assert env["pip"]["packages"][:-1] == submit.pinned_requirements()


def test_wheel_builds_the_same_way_in_any_environment():
  """The `pip wheel` of `--env pip`: setuptools >= 70.1 (a runtime dependency) builds wheels itself: offline, in this interpreter. A bare venv
  (Python 3.11's ships setuptools 65 and no `wheel`: the `invalid command 'bdist_wheel'` of --no-build-isolation)
  or none at all gets pip's isolated build instead."""
  import tomllib
  from packaging.requirements import Requirement
  project = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())["project"]
  deps = {Requirement(d).name: Requirement(d) for d in project["dependencies"]}
  assert deps["setuptools"].specifier.contains("70.1") and not deps["setuptools"].specifier.contains("70.0")
  assert submit.wheel_build_args() == ["--no-build-isolation"]   # this install: setuptools from the deps
  assert submit.wheel_build_args("84.2.1", False) == ["--no-build-isolation"]
  assert submit.wheel_build_args("65.5.0", False) == [] and submit.wheel_build_args(None, False) == []
  assert submit.wheel_build_args("65.5.0", True) == ["--no-build-isolation"]  # old setuptools + wheel works


def test_entrypoint_runs_the_staged_spec():
  assert submit.entrypoint() == "JAX_PLATFORMS=cpu python -m pgbatch.cli run job.yaml"


def test_validate_rejects_bad_specs_before_upload(job_dir, tmp_path):
  bad = tmp_path / "bad.yaml"
  bad.write_text("- just\n- a list\n")
  with pytest.raises(ValueError, match="mapping"):
    submit.validate_locally(str(bad))
  submit.validate_locally(str(job_dir / "job.yaml"))
  with pytest.raises(ValueError, match="resources.accelerator"):
    submit.validate_locally(str(job_dir / "job.yaml"), ["resources.accelerator=fpga"])
  with pytest.raises(ValueError, match="invalid job spec"):  # nothing reaches the (unreachable) head
    submit.submit(str(job_dir / "job.yaml"), "http://127.0.0.1:9", ["tasks[0].kind=poem"], env_mode="image")


def _parser(name):
  parser = argparse.ArgumentParser()
  cli.command_module(name).register(parser)
  return parser


def test_cli_parses_submit_and_status():
  assert (cli.COMMANDS["submit"], cli.COMMANDS["status"]) == ("submit", "status")
  args = _parser("submit").parse_args(["jobs/x.yaml", "--address", "http://h:8265", "--set", "a=1", "--follow"])
  assert (args.job, args.address, args.overrides, args.follow, args.env_mode) == (
      "jobs/x.yaml", "http://h:8265", ["a=1"], True, "pip")
  args = _parser("status").parse_args(["raysubmit_1", "--wait"])
  assert args.job_id == "raysubmit_1" and args.wait and callable(cli.command_module("status").main)


def test_submit_reports_unreachable_head(job_dir, capsys):
  with pytest.raises(ConnectionError):
    submit.submit(str(job_dir / "job.yaml"), "http://127.0.0.1:9", env_mode="image")
  assert cli.main(["submit", str(job_dir / "job.yaml"), "--address", "http://127.0.0.1:9", "--env", "image"]) == 2
  assert cli.main(["status", "raysubmit_x", "--address", "http://127.0.0.1:9"]) == 2
  assert "127.0.0.1:9" in capsys.readouterr().err


# --- against a real Ray head -------------------------------------------------------------------------------


def _free_ports(n: int) -> list[int]:
  socks = [socket.socket() for _ in range(n)]
  for s in socks:
    s.bind(("127.0.0.1", 0))
  ports = [s.getsockname()[1] for s in socks]
  for s in socks:
    s.close()
  return ports


def _env(**extra) -> dict:
  env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", **extra)
  env.pop("RAY_ADDRESS", None)
  return env


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
  """`ray start --head --block` in its own process group; yields the dashboard address.

  Its workers share a JAX compilation cache with tests/test_infra_cluster.py (same tiny job shapes)."""
  jax_cache = tmp_path_factory.getbasetemp() / "pgbatch-jax-cache"
  H.token_auth()  # before the head starts: it and this process's client use Ray's token auth
  gcs, dashboard, client, agent, metrics, runtime_env = _free_ports(6)
  temp = tempfile.mkdtemp(prefix="pgbrh", dir="/tmp")  # short: Ray's socket paths live under it
  ray_cli = Path(sys.executable).with_name("ray")
  cmd = [str(ray_cli) if ray_cli.exists() else "ray", "start", "--head", "--block",
         "--node-ip-address=127.0.0.1", f"--port={gcs}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dashboard}", f"--ray-client-server-port={client}",
         f"--dashboard-agent-listen-port={agent}", f"--metrics-export-port={metrics}",
         f"--runtime-env-agent-port={runtime_env}", "--num-cpus=2", f"--temp-dir={temp}", "--disable-usage-stats"]
  log = open(os.path.join(temp, "head.log"), "w")
  env = _env(JAX_COMPILATION_CACHE_DIR=str(jax_cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
  address = f"http://127.0.0.1:{dashboard}"
  from ray._private.authentication.http_token_authentication import get_auth_headers_if_auth_enabled
  probe = urllib.request.Request(f"{address}/api/jobs/", headers=get_auth_headers_if_auth_enabled({}))
  assert probe.headers, "token auth is on: the probe carries the token, as the Job Submission client does"
  try:
    deadline = time.monotonic() + 180
    while True:
      assert proc.poll() is None, f"ray start exited: {open(os.path.join(temp, 'head.log')).read()[-3000:]}"
      try:
        with urllib.request.urlopen(probe, timeout=2) as r:
          if r.status == 200:
            break
      except OSError:
        pass
      assert time.monotonic() < deadline, "the Ray head's Job Submission API did not come up in 180 s"
      time.sleep(0.5)
    yield address
  finally:
    os.killpg(proc.pid, signal.SIGTERM)  # `ray start --block` stops its processes on SIGTERM ...
    try:
      proc.wait(timeout=2)
    except subprocess.TimeoutExpired:
      pass
    try:
      os.killpg(proc.pid, signal.SIGKILL)  # ... and whatever is left of the group goes now
    except ProcessLookupError:
      pass
    proc.wait(timeout=30)
    log.close()
    shutil.rmtree(temp, ignore_errors=True)


def _pgbatch(*args, check=True) -> subprocess.CompletedProcess:
  """`pgbatch ARGS` (the console script's `cli.main`), in this process: stdout, stderr and exit status."""
  import contextlib
  import io
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    rc = cli.main(list(args))
  result = subprocess.CompletedProcess(["pgbatch", *args], rc, out.getvalue(), err.getvalue())
  if check:
    assert rc == 0, f"pgbatch {' '.join(args)}: rc {rc}\n{result.stdout}\n{result.stderr}"
  return result


@pytest.fixture(scope="module")
def tiny_job(tmp_path_factory):
  """A job dir: shards/ (3 images: two photos, one broken JPEG) referenced relatively, so submit stages it."""
  from pgbatch import demo
  root = tmp_path_factory.mktemp("submitjob")
  job = demo.prepare(root / "assets", shards=1, log=lambda m: None)
  rows = demo.samples()
  demo.write_shards(root / "shards", [rows[0], rows[1], rows[-1]], shards=1, prefix="tiny")
  spec = yaml.safe_load(job.read_text())
  spec.update(name="submitted", input={"uri": "shards/*.tar", "format": "webdataset"},
              output={"uri": str(root / "output") + "/"},
              tasks=[{"name": "caption_en", "kind": "caption", "lang": "en", "max_new_tokens": 4}],
              resources={"accelerator": "cpu", "actors": 1, "batch_size": 4},
              safety={"pii": {"enabled": False}, "toxicity": {"enabled": False}})  # no presidio start-up
  (root / "job.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
  return root


def test_submit_runs_job_and_parquet_appears(ray_head, tiny_job):
  import pyarrow.parquet as pq
  # The default --env pip: the pgbatch wheel built here + dependencies pinned to this install, in a virtualenv.
  out = _pgbatch("submit", str(tiny_job / "job.yaml"), "--address", ray_head, "--submission-id", "pgbatch-test-ok")
  job_id = out.stdout.strip().splitlines()[-1]
  assert job_id == "pgbatch-test-ok"
  status = _pgbatch("status", job_id, "--address", ray_head, "--wait", check=False)
  logs = _pgbatch("status", job_id, "--address", ray_head, "--follow").stdout  # streams the logs, then the status
  assert logs.rstrip().splitlines()[-1].startswith(f"{job_id}\tSUCCEEDED")
  assert status.returncode == 0 and status.stdout.startswith(f"{job_id}\tSUCCEEDED"), status.stdout + logs
  assert "3 images (ok 2, error 1" in logs  # `pgbatch run`'s summary line, from the cluster
  # Ray built that env before starting the entrypoint (a failed env fails the job): wheel + pins.
  env = submit.client(ray_head).get_job_info(job_id).runtime_env
  assert env["pip"]["packages"][-1].endswith(".whl") and "jax==" + __import__("jax").__version__ in env["pip"]["packages"]
  files = sorted((tiny_job / "output").glob("*.parquet"))
  assert len(files) == 1 and (tiny_job / "output" / "_manifest").exists()
  table = pq.read_table(str(files[0]))
  assert table.num_rows == 3
  assert sorted(table.column("status").to_pylist()) == ["error", "ok", "ok"]
  assert table.column("shard").to_pylist()[0].endswith("tiny-00000.tar")


def test_failed_job_is_reported(ray_head, tmp_path, monkeypatch):
  """`--env local` (this source folder); the spec is fine here, but its input is not on the cluster. The input
  comes from a PGBATCH__ override in this shell, which must reach the cluster."""
  monkeypatch.setenv("PGBATCH__INPUT__URI", "missing-by-env/*.tar")
  job = tmp_path / "job.yaml"
  spec = {"name": "no-input", "input": {"uri": "missing/*.tar"}, "output": {"uri": str(tmp_path / "out")},
          "model": {"checkpoint": "gs://b/ckpt.npz", "tokenizer": "gs://b/tok.model", "variant": "tiny-pg2"},
          "tasks": [{"name": "caption_en", "kind": "caption", "lang": "en"}]}
  job.write_text(yaml.safe_dump(spec))
  run = _pgbatch("submit", str(job), "--address", ray_head, "--env", "local", "--follow", check=False)
  job_id = run.stdout.splitlines()[0]  # the id first, then the streamed logs
  assert run.returncode == 1 and f"{job_id}: FAILED" in run.stderr, run.stdout + run.stderr
  assert "no input to process" in run.stdout and "missing-by-env/*.tar" in run.stdout  # pgbatch ran there, said why
  status = _pgbatch("status", job_id, "--address", ray_head, check=False)
  logs = _pgbatch("status", job_id, "--address", ray_head, "--logs", check=False).stdout
  assert status.returncode == 1 and status.stdout.startswith(f"{job_id}\tFAILED"), status.stdout + logs
  assert "missing-by-env/*.tar" in logs
  assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.parquet"))


def test_status_of_unknown_job(ray_head):
  out = _pgbatch("status", "no-such-job", "--address", ray_head, check=False)
  assert out.returncode == 2 and "no-such-job" in out.stderr and "Traceback" not in out.stderr
