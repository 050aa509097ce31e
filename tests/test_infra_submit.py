"""`pgbatch submit` pieces without a cluster: working-dir staging, runtime env, entrypoint, CLI wiring."""
import argparse
import zipfile
from pathlib import Path

import pytest
import yaml

from pgbatch import cli, submit


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
      "tasks": [{"kind": "caption", "prompt": "caption en"}],
  }
  (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
  return tmp_path


def test_stage_copies_only_referenced_files(job_dir, tmp_path_factory):
  dest = tmp_path_factory.mktemp("wd")
  copied = submit.stage_working_dir(job_dir / "job.yaml", dest)
  assert copied == ["assets/tok.model", "shards"]
  staged = yaml.safe_load((dest / "job.yaml").read_text())
  assert staged["input"]["uri"].endswith("-shards/*.tar")
  assert sorted(p.name for p in dest.glob(staged["input"]["uri"])) == ["s0.tar", "s1.tar"]
  assert (dest / staged["model"]["tokenizer"]).read_bytes() == b"sp"
  # URLs, absolute paths and plain words are untouched; unreferenced files stay home.
  assert staged["model"]["checkpoint"] == "gs://bucket/ckpt.npz"
  assert staged["output"]["uri"] == "/abs/out" and staged["tasks"][0]["prompt"] == "caption en"
  assert not list(dest.rglob("unrelated.bin"))


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


def test_entrypoint_quotes_overrides():
  ep = submit.entrypoint(["resources.actors=2", "name=a b"])
  assert ep == "JAX_PLATFORMS=cpu python -m pgbatch.cli run job.yaml --set resources.actors=2 --set 'name=a b'"


def test_validate_rejects_non_mapping(tmp_path):
  bad = tmp_path / "bad.yaml"
  bad.write_text("- just\n- a list\n")
  with pytest.raises(ValueError, match="mapping"):
    submit.validate_locally(str(bad))


def _parser(name):
  parser = argparse.ArgumentParser()
  getattr(submit, f"register_{name}")(parser)
  return parser


def test_cli_parses_submit_and_status():
  assert cli.COMMANDS["submit"][0] == cli.COMMANDS["status"][0] == "pgbatch.submit"
  args = _parser("submit").parse_args(["jobs/x.yaml", "--address", "http://h:8265", "--set", "a=1", "--follow"])
  assert (args.job, args.address, args.overrides, args.follow, args.env_mode) == (
      "jobs/x.yaml", "http://h:8265", ["a=1"], True, "pip")
  args = _parser("status").parse_args(["raysubmit_1", "--wait"])
  assert args.job_id == "raysubmit_1" and args.wait and callable(submit.main_status)


def test_submit_reports_unreachable_head(tmp_path, capsys):
  job = tmp_path / "job.yaml"
  job.write_text("name: x\n")
  with pytest.raises(ConnectionError):
    submit.submit(str(job), "http://127.0.0.1:9", env_mode="image")
