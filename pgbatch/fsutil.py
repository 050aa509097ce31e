"""Filesystem helpers shared by the readers, the sink, checkpoints and the job loader (fsspec; no JAX, no Ray)."""
from __future__ import annotations


def is_local(fs) -> bool:
  """True for fsspec's local filesystem (protocol "file")."""
  protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
  return "file" in protocols
