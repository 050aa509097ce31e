"""What `pgbatch validate` checks beyond the spec itself: the things `run` will need, in seconds, without Ray.

    problems = preflight.check(spec)        # [(field, message)], empty when run can start

- input: the glob matches shards (listing bounded by `timeout_s`: unreachable storage is one clear line);
- output: a folder or prefix that can be written (not an existing file; a local folder's nearest existing
  parent is writable);
- model: the checkpoint's headers parse and fit its variant, the tokenizer loads with PaliGemma's layout, and
  the VQ-VAE file holds a mask decoder when a segment task asks for one.
Each check reads headers or listings only (the tokenizer and VQ-VAE files are small and read whole). Messages
never show credentials (`scrub`).
"""
from __future__ import annotations

import os
from typing import Callable

TIMEOUT_S = 20.0


def _bounded(fn: Callable, timeout_s: float, what: str):
  """fn() with a deadline; TimeoutError naming `what` when it takes longer than timeout_s."""
  from pgbatch import errors
  try:
    return errors.call_with_deadline(fn, timeout_s)
  except TimeoutError as e:
    raise TimeoutError(f"{what}: {e} (storage unreachable, or no credentials?)") from None


def scrub(spec, problems: list[tuple[str, str]]) -> list[tuple[str, str]]:
  """Messages with the spec's credential-looking values and URL passwords/signatures redacted."""
  from pgbatch.redact import REDACTED, redact_uri
  secrets = sorted(spec.secrets(), key=len, reverse=True)
  uris = [u for u in (spec.input.uri, spec.output.uri, spec.model.checkpoint, spec.model.tokenizer, spec.model.vae)
          if u]
  out = []
  for field, msg in problems:
    for u in uris:
      msg = msg.replace(u, redact_uri(u))
    for secret in secrets:
      msg = msg.replace(secret, REDACTED)
    out.append((field, msg))
  return out


def check_input(spec, timeout_s: float = TIMEOUT_S) -> tuple[list[tuple[str, str]], list]:
  """([(field, message)], shards)."""
  problems, shards = _check_input(spec, timeout_s)
  return scrub(spec, problems), shards


def _check_input(spec, timeout_s: float) -> tuple[list[tuple[str, str]], list]:
  from pgbatch.io import listing, readers
  try:
    return [], listing.list_inputs(spec.input, timeout_s=timeout_s)
  except readers.InputError as e:
    return [("input.uri", str(e).removeprefix("input.uri: "))], []


def check_output(spec, timeout_s: float = TIMEOUT_S) -> list[tuple[str, str]]:
  return scrub(spec, _check_output(spec, timeout_s))


def _check_output(spec, timeout_s: float) -> list[tuple[str, str]]:
  """`listing.check_output` (a file, under a file, unreachable: what `run` refuses) within the timeout, then,
  for a local folder, whether its nearest existing parent can be written."""
  from pgbatch import errors
  from pgbatch.io import listing
  from pgbatch.fsutil import is_local_path
  uri = spec.output.uri
  try:
    errors.call_with_deadline(lambda: listing.check_output(uri, dict(spec.output.storage_options) or None),
                              timeout_s)
  except errors.OutputError as e:
    return [("output.uri", str(e).removeprefix("output.uri: "))]
  except TimeoutError as e:
    return [("output.uri", f"{uri}: {e} (storage unreachable, or no credentials?)")]
  if is_local_path(uri) or uri.startswith("file://"):
    parent = uri.removeprefix("file://").rstrip("/") or "/"
    while not os.path.exists(parent):
      parent = os.path.dirname(parent)
    if not os.access(parent, os.W_OK | os.X_OK):
      return [("output.uri", f"{uri}: cannot write in {parent} (permission denied)")]
  return []


def check_model(spec, timeout_s: float = TIMEOUT_S) -> list[tuple[str, str]]:
  return scrub(spec, _check_model(spec, timeout_s))


def _check_model(spec, timeout_s: float) -> list[tuple[str, str]]:
  from pgbatch import checkpoints, tokenizer
  problems = []
  try:
    with _bounded(lambda: checkpoints.open_checkpoint(spec.model.checkpoint, variant=spec.model.variant),
                  timeout_s, f"reading {spec.model.checkpoint}") as ckpt:
      ckpt.check()
  except Exception as e:  # noqa: BLE001 - CheckpointError names the file and the key
    problems.append(("model.checkpoint", str(e)))
  try:
    _bounded(lambda: tokenizer.load(spec.model.tokenizer), timeout_s, f"reading {spec.model.tokenizer}")
  except Exception as e:  # noqa: BLE001
    problems.append(("model.tokenizer", str(e)))
  if spec.model.vae and any(t.kind == "segment" for t in spec.tasks):
    try:
      _bounded(lambda: _vae_keys(spec.model.vae), timeout_s, f"reading {spec.model.vae}")
    except FileNotFoundError:
      problems.append(("model.vae", f"{spec.model.vae} not found"))
    except Exception as e:  # noqa: BLE001
      problems.append(("model.vae", f"{spec.model.vae}: {type(e).__name__}: {e}"))
  return problems


VAE_KEYS = ("_vq_vae._embedding", "decoder.0.weight", "decoder.12.weight")  # a few of model/vqvae.py's names


def _vae_keys(uri: str) -> None:
  """Raises KeyError unless the npz at `uri` has the VQ-VAE decoder's keys (numpy only: validate loads no JAX;
  the actors load it with `model.vqvae.load`, which checks every key and shape)."""
  import io
  import fsspec
  import numpy as np
  with fsspec.open(uri, "rb") as f:
    data = f.read()
  with np.load(io.BytesIO(data), allow_pickle=False) as npz:
    missing = [k for k in VAE_KEYS if k not in npz.files]
  if missing:
    raise KeyError(f"not a VQ-VAE checkpoint, missing keys: {missing}")


def check(spec, timeout_s: float = TIMEOUT_S) -> list[tuple[str, str]]:
  """Every problem `run` would meet before annotating anything, as (field, message)."""
  problems, _ = check_input(spec, timeout_s)
  return problems + check_output(spec, timeout_s) + check_model(spec, timeout_s)
