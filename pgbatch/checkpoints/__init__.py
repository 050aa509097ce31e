"""PaliGemma checkpoints: big_vision `.npz` and Hugging Face safetensors, from any fsspec URL, one tensor at a time.

    ck = open_checkpoint("gs://bucket/pt_224.bf16.npz")     # or a HF directory, or split `x.npz.part00, …`
    ck.check(ck.config)                                     # names and shapes, before any tensor data is read
    for name, array in ck.tensors():                        # flat big_vision names, numpy, stored dtype
      ...

Every format is presented in big_vision layout: the flat `/`-joined names of `configs.param_shapes`, layers stacked on
a leading depth axis, 257152 vocabulary rows. Hugging Face tensors are transposed/reshaped on the fly (spec §7).
Peak host memory is about one (stacked) tensor: nothing is concatenated on disk or downloaded whole. Numpy only:
importing this package does not import JAX (placing tensors on devices is `pgbatch.model.loading.place`).

Modules: `sources` (byte sources), `npz`, `safetensors_file`, `hf_mapping` (big_vision <-> HF names and layouts),
`architecture` (configs from shapes / config.json), `hf` (opening a HF directory), `hf_write`, `checkpoint` (the
opened checkpoint and its provenance), `errors`.
"""
from __future__ import annotations

import os
from typing import Optional

from pgbatch.checkpoints.architecture import config_from_hf, config_from_shapes, hf_config_dict
from pgbatch.checkpoints.checkpoint import FORMAT_HF, FORMAT_NPZ, Checkpoint, CheckpointInfo
from pgbatch.checkpoints.errors import (CheckpointError, CheckpointNotFoundError, CorruptCheckpointError,
                                        MissingKeyError, ShapeMismatchError, UnexpectedKeyError, UnknownFormatError)
from pgbatch.checkpoints.hf import open_hf
from pgbatch.checkpoints.hf_mapping import canonical_hf_key
from pgbatch.checkpoints.hf_write import write_hf, write_hf_stream
from pgbatch.checkpoints.npz import NPZ_NAME, open_npz, write_npz, write_npz_stream
from pgbatch.checkpoints.sources import file_info, glob_escape, resolve
from pgbatch.model import configs

__all__ = ["open_checkpoint", "Checkpoint", "CheckpointInfo", "FORMAT_HF", "FORMAT_NPZ", "CheckpointError",
           "CheckpointNotFoundError", "CorruptCheckpointError", "MissingKeyError", "ShapeMismatchError",
           "UnexpectedKeyError", "UnknownFormatError", "config_from_hf", "config_from_shapes", "hf_config_dict",
           "canonical_hf_key", "write_hf", "write_hf_stream", "write_npz", "write_npz_stream", "glob_escape"]


def open_checkpoint(uri: str, variant: Optional[str] = None) -> Checkpoint:
  """Opens a big_vision .npz (also `.b16.npz`/`.f16.npz` and split `.npz.partNN`) or a HF safetensors directory
  at any fsspec URL (local path, file://, gs://, s3://, hf://, …).

  Reads only headers. The config is inferred from the tensor shapes (big_vision) or config.json (HF).
  `variant` names a registered config that replaces the inferred one; it is checked against the tensor
  shapes (raises MissingKeyError/UnexpectedKeyError/ShapeMismatchError). Every failure is a CheckpointError
  whose message names the URI.
  """
  uri = str(uri)
  try:
    ck = _open(uri, variant)
  except CheckpointError:
    raise
  except FileNotFoundError as e:
    raise CheckpointNotFoundError(f"checkpoint not found: {uri} ({e})") from None
  except (OSError, EOFError, ValueError) as e:
    raise CheckpointError(f"cannot read checkpoint {uri}: {type(e).__name__}: {e}") from None
  if variant is not None:
    try:
      cfg = configs.get(variant)
    except ValueError as e:
      ck.close()
      raise CheckpointError(str(e)) from None
    try:
      ck.check(cfg)
    except CheckpointError:
      ck.close()
      raise
    ck.config = cfg
  return ck


def _open(uri: str, variant: Optional[str]) -> Checkpoint:
  fs, path = resolve(uri)
  info = file_info(fs, path)
  if info is not None and info.get("type") != "directory" and (os.path.basename(path) in (
      "config.json", "model.safetensors", "model.safetensors.index.json") or path.endswith(".safetensors")):
    path, info = os.path.dirname(path), file_info(fs, os.path.dirname(path))
  is_dir = info is not None and info.get("type") == "directory"
  if not is_dir and not NPZ_NAME.match(path) and file_info(fs, f"{path}/config.json") is not None:
    is_dir = True  # stores without directories (http://): a HF layout is known by its config.json
  if is_dir:
    return open_hf(uri, fs, path)
  return open_npz(uri, fs, path, info, variant)

