"""`pgbatch submit JOB.yaml --address http://HEAD:8265` and `pgbatch status JOB_ID`: Ray's Job Submission API.

What a submission carries (`ray job submit` semantics):
- working_dir: a fresh folder with the job file at its root plus every *relative* local file, folder or
  glob the spec names (rewritten to their copies). Not the whole cwd. Absolute paths and URLs
  (gs://, s3://) are left alone: they must resolve on the cluster (object storage or a shared mount).
- runtime_env, by `--env`:
  - `image` (with the infra/ manifests): nothing shipped; the container image has pgbatch and its dependencies.
  - `pip`: the pgbatch wheel built from this install (shipped in the working dir) + its dependencies
    pinned to the versions installed here, pip-installed in the job's virtualenv; for clusters whose
    image lacks pgbatch. Ray itself is never pinned (the cluster's Ray is inherited).
  - `local` (development): the pgbatch source folder as a `py_modules` entry; the cluster already has
    the dependencies (e.g. the image of the previous release). Takes precedence over an installed pgbatch.
  Every `PGBATCH__…` variable of the submitting shell goes along (`env_vars`), so the spec that runs is
  the spec validated here (`pgbatch.config` reads them as field overrides).
- entrypoint: `python -m pgbatch.cli run job.yaml [--set k=v …]` with JAX on CPU in the driver.
The spec is validated here first (with the overrides and environment), so a typo fails before any upload.
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import importlib.metadata
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable

import yaml

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
JOB_FILE = "job.yaml"
GLOB_CHARS = re.compile(r"[*?\[]")
URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
NEVER_PIN = ("ray",)  # the cluster's Ray must not be replaced by a runtime env


# --- working dir ----------------------------------------------------------------------------------------


def _local_root(value: str) -> str | None:
  """The part of a relative path or glob that must be copied, or None for URLs, absolute paths, words."""
  if not value or URL.match(value) or os.path.isabs(value) or "\n" in value:
    return None
  parts = Path(value).parts
  if GLOB_CHARS.search(value):
    parts = parts[:next(i for i, p in enumerate(parts) if GLOB_CHARS.search(p))]
  return str(Path(*parts)) if parts else None


def _walk_strings(node: Any, fn) -> Any:
  """A copy of a YAML tree with `fn` applied to every string leaf."""
  if isinstance(node, dict):
    return {k: _walk_strings(v, fn) for k, v in node.items()}
  if isinstance(node, list):
    return [_walk_strings(v, fn) for v in node]
  return fn(node) if isinstance(node, str) else node


def _copy(src: Path, dst: Path) -> None:
  dst.parent.mkdir(parents=True, exist_ok=True)
  if src.is_dir():
    shutil.copytree(src, dst, dirs_exist_ok=True)
  else:
    shutil.copy2(src, dst)


def stage_working_dir(job_path: str | os.PathLike, dest: str | os.PathLike) -> list[str]:
  """Copy the job file to `dest/job.yaml` with the local files it references under `dest/files/`.

  Relative paths are resolved against the job file's folder. Returns the copied relative paths.
  """
  job_path, dest = Path(job_path).resolve(), Path(dest)
  base = job_path.parent
  spec = yaml.safe_load(job_path.read_text()) or {}
  copied: dict[str, str] = {}

  def rewrite(value: str) -> str:
    root = _local_root(value)
    if root is None or not (base / root).exists() or (base / root).resolve() == job_path:
      return value
    if root not in copied:
      copied[root] = f"files/{len(copied)}-{Path(root).name or 'root'}"
      _copy(base / root, dest / copied[root])
    return copied[root] + value[len(root):] if value.startswith(root) else value.replace(root, copied[root], 1)

  dest.mkdir(parents=True, exist_ok=True)
  (dest / JOB_FILE).write_text(yaml.safe_dump(_walk_strings(spec, rewrite), sort_keys=False))
  return sorted(copied)


# --- runtime env ----------------------------------------------------------------------------------------


def _requirements() -> list[str]:
  """pgbatch's runtime requirements (no extras), from the installed metadata or pyproject.toml."""
  try:
    reqs = importlib.metadata.requires("pgbatch") or []
  except importlib.metadata.PackageNotFoundError:
    import tomllib
    reqs = tomllib.loads((package_dir().parent / "pyproject.toml").read_text())["project"]["dependencies"]
  return [r for r in reqs if "extra ==" not in r]


def _dist_name(requirement: str) -> str:
  return re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0]


def pinned_requirements() -> list[str]:
  """Dependencies pinned to the versions installed here (`name==version`), Ray excluded."""
  pins = []
  for req in _requirements():
    name = _dist_name(req)
    if name.lower() in NEVER_PIN:
      continue
    try:
      pins.append(f"{name}=={importlib.metadata.version(name)}")
    except importlib.metadata.PackageNotFoundError:
      pins.append(req)
  return pins


def package_dir() -> Path:
  import pgbatch
  return Path(pgbatch.__file__).resolve().parent


def build_wheel(out_dir: str | os.PathLike) -> Path:
  """`pip wheel --no-deps` of the pgbatch source this module was imported from."""
  project = package_dir().parent
  subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                  "-w", str(out_dir), str(project)], check=True)
  return next(Path(out_dir).glob("pgbatch-*.whl"))


def runtime_env(mode: str, working_dir: str, wheel_dir: str | None = None, env_vars: dict | None = None) -> dict:
  """The job's runtime env for `--env image|pip|local` (see the module doc)."""
  env: dict[str, Any] = {"working_dir": working_dir, "env_vars": dict(env_vars or {})}
  if mode == "local":
    env["py_modules"] = [str(package_dir())]
  elif mode == "pip":
    wheel = build_wheel(wheel_dir or tempfile.mkdtemp(prefix="pgbatch-wheel-"))
    # A content-addressed folder: Ray caches pip envs by their spec, so a rebuilt wheel needs a new path.
    rel = f"wheels/{hashlib.sha256(wheel.read_bytes()).hexdigest()[:16]}/{wheel.name}"
    _copy(wheel, Path(working_dir) / rel)
    # The wheel travels in the working dir; pip resolves its dependencies against the pins (and the
    # cluster's own Ray, which the runtime env's virtualenv inherits).
    env["pip"] = {"packages": pinned_requirements() + [f"${{RAY_RUNTIME_ENV_CREATE_WORKING_DIR}}/{rel}"],
                  "pip_check": False}
  elif mode != "image":
    raise ValueError(f"--env must be image, pip or local, got {mode!r}")
  return env


def forwarded_env(environ=None) -> dict:
  """The `PGBATCH__…` field overrides of this shell (see `pgbatch.config`), for the job's environment."""
  environ = os.environ if environ is None else environ
  return {k: v for k, v in environ.items() if k.upper().startswith("PGBATCH__")}


def entrypoint(overrides: Iterable[str] = ()) -> str:
  sets = "".join(f" --set {shlex.quote(o)}" for o in overrides)
  return f"JAX_PLATFORMS=cpu python -m pgbatch.cli run {JOB_FILE}{sets}"


# --- local validation -----------------------------------------------------------------------------------


def validate_locally(job_path: str, overrides: Iterable[str] = ()) -> None:
  """Validate the spec here (with the `--set` overrides) before anything is uploaded; `ValueError` if invalid.

  The cluster validates again on `pgbatch run`, with its own environment (`${VAR}`, `PGBATCH__…`).
  """
  from pgbatch import config
  try:
    config.load(job_path, list(overrides))
  except config.JobSpecError as e:
    raise ValueError(str(e)) from None


# --- client ---------------------------------------------------------------------------------------------


def client(address: str | None):
  from ray.job_submission import JobSubmissionClient
  return JobSubmissionClient(address or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS)


def submit(job_path: str, address: str | None = None, overrides: Iterable[str] = (), env_mode: str = "pip",
           submission_id: str | None = None, env_vars: dict | None = None) -> str:
  """Validate, stage and submit `job_path`; returns the Ray job id."""
  overrides = list(overrides)
  validate_locally(job_path, overrides)
  env_vars = {**forwarded_env(), **(env_vars or {})}
  with tempfile.TemporaryDirectory(prefix="pgbatch-submit-") as tmp:
    work = os.path.join(tmp, "working_dir")
    stage_working_dir(job_path, work)
    env = runtime_env(env_mode, work, os.path.join(tmp, "wheel"), env_vars)
    return client(address).submit_job(
        entrypoint=entrypoint(overrides), runtime_env=env, submission_id=submission_id,
        metadata={"pgbatch_job": Path(job_path).name})


def follow(address: str | None, job_id: str, out=None) -> str:
  """Stream the job's logs until it ends; returns its final status."""
  out = out or sys.stdout
  c = client(address)

  async def tail():
    async for chunk in c.tail_job_logs(job_id):
      out.write(chunk)
      out.flush()
  asyncio.run(tail())
  return wait(address, job_id, timeout_s=60)


def wait(address: str | None, job_id: str, timeout_s: float = 3600, poll_s: float = 1.0) -> str:
  """Poll until the job is SUCCEEDED, FAILED or STOPPED (or `timeout_s`); returns the status."""
  c, deadline = client(address), time.monotonic() + timeout_s
  while True:
    status = str(c.get_job_status(job_id).value)
    if status in TERMINAL or time.monotonic() > deadline:
      return status
    time.sleep(poll_s)


# --- CLI ------------------------------------------------------------------------------------------------


def _address_arg(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--address", default=None,
                      help=f"Ray dashboard address (default: $RAY_ADDRESS or {DEFAULT_ADDRESS})")


def register_submit(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("job", help="job spec (YAML)")
  _address_arg(parser)
  parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="override a spec field (repeatable); validated here, forwarded to the run")
  parser.add_argument("--env", dest="env_mode", choices=("image", "pip", "local"), default="pip",
                      help="how pgbatch reaches the cluster: the image has it | this wheel + pinned deps "
                           "(default) | this source folder, dependencies already there")
  parser.add_argument("--submission-id", default=None, help="job id to use (default: Ray picks one)")
  parser.add_argument("--follow", action="store_true", help="stream logs until the job ends")


def main_submit(args: argparse.Namespace) -> int:
  try:
    job_id = submit(args.job, args.address, args.overrides, args.env_mode, args.submission_id)
  except (ValueError, ConnectionError) as e:
    print(f"pgbatch submit: {e}", file=sys.stderr)
    return 2
  print(job_id, flush=True)
  if not args.follow:
    return 0
  status = follow(args.address, job_id)
  print(f"{job_id}: {status}", file=sys.stderr)
  return 0 if status == "SUCCEEDED" else 1


def register_status(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("job_id", help="id printed by `pgbatch submit`")
  _address_arg(parser)
  parser.add_argument("--logs", action="store_true", help="print the logs so far")
  parser.add_argument("--follow", action="store_true", help="stream logs until the job ends")
  parser.add_argument("--wait", action="store_true", help="block until the job ends; exit 0 only if it succeeded")


def main_status(args: argparse.Namespace) -> int:
  try:
    c = client(args.address)
    info = c.get_job_info(args.job_id)
  except (RuntimeError, ConnectionError) as e:  # unknown id (HTTP 404) / no Ray head there
    print(f"pgbatch status: {args.job_id}: {e}", file=sys.stderr)
    return 2
  if args.logs:
    print(c.get_job_logs(args.job_id), end="")
  status = follow(args.address, args.job_id) if args.follow else (
      wait(args.address, args.job_id) if args.wait else str(info.status.value))
  message = c.get_job_info(args.job_id).message or ""
  print(f"{args.job_id}\t{status}\t{message}".rstrip())
  if args.follow or args.wait:
    return 0 if status == "SUCCEEDED" else 1
  return 1 if status in ("FAILED", "STOPPED") else 0
