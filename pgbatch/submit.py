"""`pgbatch submit JOB.yaml --address http://HEAD:8265` and `pgbatch status JOB_ID`: Ray's Job Submission API.

What a submission carries (`ray job submit` semantics); `--dry-run` prints it and stops:
- working_dir: a fresh folder with exactly the job: `job.yaml` (the spec with this shell's `PGBATCH__…` and
  `--set` overrides baked in, so the spec that runs is the spec validated here) and, under `files/`, the local
  files named by *relative* paths in the spec's path fields (`config.PATH_FIELDS`: input.uri, model.checkpoint
  / tokenizer / vae, safety.hashlist.uri; never other strings): a named file (its split `.partNN` siblings), or
  the files of a named folder or glob, without hidden files and without symlinks leading out of that folder.
  Those fields are rewritten to the copies. Absolute paths, `${VAR}` paths and URLs (gs://, s3://) are left
  alone: they must resolve on the cluster. A relative `output.uri` is refused: the job must write to shared
  storage.
- runtime_env, by `--env`:
  - `image` (with the infra/ manifests): nothing shipped; the container image has pgbatch and its dependencies.
  - `pip`: the pgbatch wheel built from this install (shipped in the working dir) + its dependencies
    pinned to the versions installed here, pip-installed in the job's virtualenv; for clusters whose
    image lacks pgbatch. Ray itself is never pinned (the cluster's Ray is inherited).
  - `local` (development): the pgbatch source folder as a `py_modules` entry; the cluster already has
    the dependencies (e.g. the image of the previous release). Takes precedence over an installed pgbatch.
- entrypoint: `python -m pgbatch.cli run job.yaml` with JAX on CPU in the driver.
The spec is validated here first (with the overrides and environment), so a typo fails before any upload.
"""
from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import importlib.metadata
import os
import re
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
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
NEVER_PIN = ("ray",)  # the cluster's Ray must not be replaced by a runtime env


# --- working dir ----------------------------------------------------------------------------------------

STAGED = "files"
PART = re.compile(r"\.part\d+$")  # split big_vision checkpoints: x.npz.part00, x.npz.part01, ...


@dataclasses.dataclass(frozen=True)
class Upload:
  """One local file the job ships: which spec field names it, where it is here, where it lands."""
  field: str
  source: Path
  dest: str  # relative to the working dir


def _is_relative_local(value: Any) -> bool:
  """A relative local path as written in a spec (not a URL, not absolute, no `${VAR}` left for the cluster)."""
  from pgbatch.fsutil import is_local_path
  return (isinstance(value, str) and bool(value.strip()) and is_local_path(value) and "${" not in value
          and not value.startswith(("/", "~")))


def _staged_name(rel: str) -> str:
  """`assets/tok.model` → `files/assets/tok.model`; `../m/x.npz` → `files/_parent/m/x.npz`."""
  parts = ["_parent" if p == ".." else p for p in Path(os.path.normpath(rel)).parts if p not in ("", ".")]
  return "/".join([STAGED, *parts])


def _members(root: Path, paths: Iterable[Path]) -> tuple[list[Path], list[str]]:
  """(regular files under `root`, skipped): hidden files/folders (any part below root starting with ".") and
  symlinks whose target is outside `root` are skipped."""
  real_root, keep, skipped = root.resolve(), [], []
  for p in sorted(set(paths)):
    rel = p.relative_to(root)
    if any(x.startswith(".") for x in rel.parts):
      skipped.append(f"{p} (hidden)")
    elif not p.resolve().is_relative_to(real_root):
      skipped.append(f"{p} (symlink to {p.resolve()}, outside {root})")
    elif p.is_file():
      keep.append(p)
  return keep, skipped


def _walk(root: Path) -> list[Path]:
  return [Path(d) / f for d, _, files in os.walk(root) for f in files]


def uploads_for(field: str, value: str, base: Path) -> tuple[list[Upload], list[str]]:
  """The files a relative path field names (see the module doc): a file (followed if a symlink: it is named),
  its split `.partNN` siblings, a folder's or a glob's non-hidden files that stay inside it."""
  from pgbatch.io.readers import expand_braces
  if GLOB_CHARS.search(value) or "{" in value:
    static = value[:min(m.start() for m in (GLOB_CHARS.search(value), re.search(r"\{", value)) if m)]
    root_rel = static[:static.rfind("/") + 1] if "/" in static else ""
    import glob
    found = [Path(p) for pat in expand_braces(value) for p in glob.glob(str(base / pat), recursive=True)]
    files, skipped = _members(base / root_rel, found)
  elif (base / value).is_dir():
    files, skipped = _members(base / value, _walk(base / value))
  elif (base / value).is_file():
    files, skipped = [base / value], []
  else:
    parent = (base / value).parent
    files = sorted(p for p in parent.glob(Path(value).name + ".part*") if PART.search(p.name)) if parent.is_dir() else []
    files, skipped = _members(parent, files)
  base_real = os.path.normpath(str(base))
  return [Upload(field, p, _staged_name(os.path.relpath(os.path.normpath(str(p)), base_real))) for p in files], skipped


def plan_upload(job_path: str | os.PathLike, overrides: Iterable[str] = (), environ=None
                ) -> tuple[dict, list[Upload], list[str]]:
  """(the spec to stage, files to ship, skipped files) for `job_path` with the `PGBATCH__…` and `--set`
  overrides baked in. Only `config.PATH_FIELDS` are looked at. Raises ValueError for a relative output."""
  from pgbatch import config
  job_path = Path(job_path).resolve()
  base = job_path.parent
  tree = config.merged_tree(config.read_yaml(str(job_path))[0] or {}, overrides, environ)
  out = config.get_path(tree, "output.uri")
  if _is_relative_local(out):
    raise ValueError(f"output.uri: {out!r} is a relative path; a cluster job must write to shared storage "
                     "(gs://…, s3://…, or an absolute path on a mount every node shares)")
  uploads: list[Upload] = []
  skipped: list[str] = []
  for field in config.PATH_FIELDS:
    section, _, key = field.rpartition(".")
    node, value = config.get_path(tree, section), config.get_path(tree, field)
    if field == "output.uri" or not _is_relative_local(value):
      continue
    found, skip = uploads_for(field, value, base)
    uploads += found
    skipped += skip
    if found:
      node[key] = _staged_name(value) + ("/" if value.endswith("/") else "")
  return tree, uploads, skipped


def stage_working_dir(job_path: str | os.PathLike, dest: str | os.PathLike, overrides: Iterable[str] = (),
                      environ=None) -> list[Upload]:
  """Writes `dest/job.yaml` (the spec with overrides baked in and shipped paths rewritten) and copies exactly
  the uploads of `plan_upload` under `dest/files/`. Returns the uploads."""
  tree, uploads, skipped = plan_upload(job_path, overrides, environ)
  dest = Path(dest)
  for u in uploads:
    (dest / u.dest).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(u.source, dest / u.dest)
  dest.mkdir(parents=True, exist_ok=True)
  (dest / JOB_FILE).write_text(yaml.safe_dump(tree, sort_keys=False))
  for s in skipped:
    print(f"pgbatch submit: not shipped: {s}", file=sys.stderr)
  return uploads


def _copy(src: Path, dst: Path) -> None:
  dst.parent.mkdir(parents=True, exist_ok=True)
  shutil.copy2(src, dst)


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


def wheel_build_args(setuptools_version: str | None = "", has_wheel: bool | None = None) -> list[str]:
  """How to build the wheel here. setuptools >= 70.1 (a pgbatch dependency) builds wheels by itself, so the
  build runs offline in this interpreter; where it is missing or older without `wheel` (pgbatch imported from a
  source tree into a bare venv: Python 3.11's venv has setuptools 65) pip builds in an isolated environment with
  the backend pyproject.toml names (that needs the package index). Arguments default to this interpreter's."""
  import importlib.util
  if setuptools_version == "":
    try:
      setuptools_version = importlib.metadata.version("setuptools")
    except importlib.metadata.PackageNotFoundError:
      setuptools_version = None
  if has_wheel is None:
    has_wheel = importlib.util.find_spec("wheel") is not None
  if setuptools_version is None:
    return []
  major, minor = (int(re.match(r"\d+", x).group()) for x in (setuptools_version.split(".") + ["0"])[:2])
  return ["--no-build-isolation"] if (major, minor) >= (70, 1) or has_wheel else []


def build_wheel(out_dir: str | os.PathLike) -> Path:
  """`pip wheel --no-deps` of the pgbatch source this module was imported from (see `wheel_build_args`)."""
  project = package_dir().parent
  subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", *wheel_build_args(), "-q",
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


def entrypoint() -> str:
  """The job's command: the staged spec (overrides already baked in), JAX on CPU in the driver."""
  return f"JAX_PLATFORMS=cpu python -m pgbatch.cli run {JOB_FILE}"


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
  with tempfile.TemporaryDirectory(prefix="pgbatch-submit-") as tmp:
    work = os.path.join(tmp, "working_dir")
    stage_working_dir(job_path, work, overrides)
    env = runtime_env(env_mode, work, os.path.join(tmp, "wheel"), env_vars)
    return client(address).submit_job(
        entrypoint=entrypoint(), runtime_env=env, submission_id=submission_id,
        metadata={"pgbatch_job": Path(job_path).name})


def dry_run(job_path: str, overrides: Iterable[str] = (), env_mode: str = "pip", out=None) -> None:
  """Validate and print what `submit` would upload (nothing is built, copied or sent)."""
  out = out or sys.stdout
  overrides = list(overrides)
  validate_locally(job_path, overrides)
  _, uploads, skipped = plan_upload(job_path, overrides)
  print(f"{JOB_FILE}\t(the spec{', with the overrides' if overrides else ''})", file=out)
  for u in uploads:
    print(f"{u.dest}\t{u.source}\t{u.source.stat().st_size} B\t{u.field}", file=out)
  if env_mode == "pip":
    print("wheels/<sha256>/pgbatch-*.whl\t(built from this install at submit)", file=out)
  for s_ in skipped:
    print(f"pgbatch submit: not shipped: {s_}", file=sys.stderr)


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
