"""Shared types of the safety filters: findings and filter identity."""
from __future__ import annotations

import functools
import hashlib
import os
from importlib import metadata
from typing import NamedTuple


class Finding(NamedTuple):
  """One score from one filter on one field; start/end are character offsets or None."""
  filter: str
  category: str
  field: str
  score: float
  start: int | None = None
  end: int | None = None


class Hit(NamedTuple):
  """A field-less finding, as a filter returns it for one text."""
  category: str
  score: float
  start: int | None = None
  end: int | None = None


def hits_to_findings(name: str, field: str, hits: list[Hit]) -> list[Finding]:
  return [Finding(name, h.category, field, float(h.score), h.start, h.end) for h in hits]


@functools.lru_cache(maxsize=None)
def files_sha256(*paths: str) -> str:
  """sha256 over the bytes of the files, in order."""
  h = hashlib.sha256()
  for p in paths:
    with open(p, "rb") as f:
      for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
  return h.hexdigest()


def pkg_version(*dists: str) -> str:
  """'dist==version' for each distribution, joined by ';'."""
  return ";".join(f"{d}=={metadata.version(d)}" for d in dists)


def cache_dir() -> str:
  """Where pgbatch keeps generated artefacts ($PGBATCH_CACHE_DIR, else ~/.cache/pgbatch)."""
  return os.environ.get("PGBATCH_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "pgbatch")
