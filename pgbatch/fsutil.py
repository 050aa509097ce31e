"""Filesystem helpers shared by the readers, the sink, checkpoints and the job loader (fsspec; no JAX, no Ray)."""
from __future__ import annotations

import re

URL_RE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def is_local(fs) -> bool:
  """True for fsspec's local filesystem (protocol "file")."""
  protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
  return "file" in protocols


def is_local_path(value: str) -> bool:
  """A plain local path as written in a job spec: not a URL, not `file:` (those stay as given)."""
  return bool(value) and not URL_RE.match(value) and not value.startswith("file:")
