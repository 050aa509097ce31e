"""Shared pieces of the pipeline tests: a tiny random-weight model on disk, job specs, a local Ray, readers."""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pgbatch import demo

ROOT = Path(__file__).resolve().parent.parent
VARIANT = "tiny-pg2"


def tiny_model(directory) -> tuple[str, str]:
  """(checkpoint path, tokenizer path): tiny-pg2 with random weights and the test tokenizer (written once)."""
  ckpt, tok = demo.write_model(directory, VARIANT)
  return str(ckpt), str(tok)


def job(name: str, input_uri: str, output_uri: str, ckpt: str, tok: str, tasks=None, fast_safety: bool = False,
        fmt: str = "webdataset", batch_size: int = 4, **extra) -> dict:
  """A job spec dict on the cpu accelerator. fast_safety: only the cheap filters (skips loading presidio)."""
  spec = {
      "name": name, "input": {"uri": input_uri, "format": fmt}, "output": {"uri": output_uri},
      "model": {"checkpoint": ckpt, "tokenizer": tok, "variant": VARIANT, "dtype": "float32"},
      "tasks": tasks or [{"name": "caption_en", "kind": "caption", "lang": "en", "max_new_tokens": 8}],
      "resources": {"accelerator": "cpu", "actors": 1, "batch_size": batch_size},
      "decode": {"batch_size": 8},
  }
  if fast_safety:
    spec["safety"] = {"pii": {"enabled": False}, "toxicity": {"enabled": False}}
  spec.update(extra)
  return spec


@contextlib.contextmanager
def local_ray(num_cpus: int = 2):
  """A private local Ray for this test module (never another helper's cluster): loopback only, Ray's default
  token auth (`placement.start_local_ray`, as `pgbatch run` starts it)."""
  import ray
  from pgbatch import placement
  placement.start_local_ray(num_cpus=num_cpus, logging_level="WARNING", object_store_memory=512 << 20)
  try:
    yield ray
  finally:
    ray.shutdown()


def token_auth() -> None:
  """Ray's token authentication for clusters this process connects to (`ray start` heads, test clusters) and
  for its Job Submission client: a token in ~/.ray/auth_token (generated once, as `ray get-auth-token
  --generate` does) and RAY_AUTH_MODE=token, which a local `ray.init()` sets by itself."""
  from ray._private.authentication import authentication_token_setup as auth
  from ray._raylet import AuthenticationTokenLoader, Config
  if not AuthenticationTokenLoader.instance().has_token(ignore_auth_mode=True):
    auth.generate_and_save_token()
    AuthenticationTokenLoader.instance().reset_cache()
  os.environ["RAY_AUTH_MODE"] = "token"
  Config.initialize("")  # this process's cached Ray config re-reads the mode


def subprocess_env() -> dict:
  env = dict(os.environ)
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), RAY_ADDRESS="")
  return env


def pgbatch_cmd(*args: str) -> list[str]:
  return [sys.executable, "-m", "pgbatch.cli", *args]


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
  return subprocess.run(pgbatch_cmd(*args), env=subprocess_env(), cwd=str(ROOT), capture_output=True, text=True,
                        timeout=timeout)


def read_output(output_uri: str, fs=None) -> tuple[list[dict], dict[str, pa.Table]]:
  """(manifest entries, file name -> table) of the committed output; `fs` for object stores."""
  from pgbatch.io import sink
  entries = sink.read_manifest(output_uri)
  tables = {}
  for e in entries:
    if fs is None:
      tables[e["name"]] = pq.read_table(e["file"])
    else:
      tables[e["name"]] = pq.read_table(e["file"].split("://", 1)[-1], filesystem=fs, use_threads=False)
  return entries, tables


def dump(obj) -> str:
  return json.dumps(obj, indent=1, default=str)
