"""Confinement of indirect image sources: a path or URL found *inside* the data may only name a file under an
allowed root. Data never decides what the process reads or fetches.

    roots = allowed_roots(spec.input.uri, spec.input.allowed_sources)   # on the driver, once
    uri = confine("imgs/a.png", "gs://b/data/part-0.parquet", roots)    # per cell; raises ForbiddenSource

- A relative path is resolved against the folder of the shard that holds it; `..` is applied before the check.
- The default root is the input's own prefix: the folder part of `input.uri` before any glob or brace
  (`gs://b/data/*.parquet` → `gs://b/data/`; a single file → its folder). `input.allowed_sources` (URI prefixes)
  add roots explicitly (`https://cdn.example.com/images/`, `gs://other-bucket/photos/`).
- A prefix matches whole path segments (`gs://b/img` allows `gs://b/img/x.png`, not `gs://b/imgs/x.png`);
  protocols must match (`gcs` = `gs`, `file://` = a local path); local paths are compared after resolving
  symlinks (an allowed folder cannot link out of itself). Chained URLs (`simplecache::…`), `data:` URLs,
  backslashes, NULs and percent-encoded dots or slashes in a path are refused outright. HTTP redirects are not
  followed (a redirect reads as an empty image).
Nothing here opens a file or makes a request; local paths are only `lstat`ed to resolve symlinks.
"""
from __future__ import annotations

import os
import posixpath
import re
import urllib.parse
from typing import Iterable, Sequence

SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*$")
LOCAL_PROTOCOLS = ("", "file", "local")
ALIASES = {"gcs": "gs", "s3a": "s3"}
WILDCARDS = re.compile(r"[*?\[{]")
SUSPICIOUS = re.compile(r"%(2e|2f|5c|00)|\\|\x00", re.I)
SHOWN_CHARS = 200  # of a refused path, in the error message


class ForbiddenSource(ValueError):
  """A path or URL in the data that points outside the allowed roots (an error row, never a read)."""


def _split(uri: str) -> tuple[str, str]:
  """(protocol, path): protocol "" for local paths, aliases folded; raises ForbiddenSource for what fsspec
  would read in a way this module does not check (chains, data: URLs, odd protocol names)."""
  if "::" in uri:
    raise ForbiddenSource("chained fsspec URLs are not allowed")
  if uri.lower().startswith("data:"):
    raise ForbiddenSource("data: URLs are not allowed")
  if "://" not in uri:
    return "", uri
  proto, path = uri.split("://", 1)
  proto = proto.lower()
  if not SCHEME.match(proto):
    raise ForbiddenSource(f"{proto!r} is not a URL protocol")
  proto = ALIASES.get(proto, proto)
  return ("" if proto in LOCAL_PROTOCOLS else proto), path


def _norm_path(path: str, absolute: bool) -> str:
  out = posixpath.normpath(path) if path else ""
  if out.startswith("//"):
    out = "/" + out.lstrip("/")
  if out == "." or out.startswith("../") or out == "..":
    raise ForbiddenSource("the path climbs above its root")
  return out if not absolute or out.startswith("/") else "/" + out


def normalize(uri: str) -> str:
  """The canonical form compared and opened: an absolute local path, or `protocol://normalized/path[?query]`."""
  proto, path = _split(uri)
  if not proto:
    if not path.startswith("/"):
      raise ForbiddenSource("not an absolute path")
    return _norm_path(path, absolute=True)
  if proto in ("http", "https"):
    parts = urllib.parse.urlsplit(f"{proto}://{path}")
    norm = _norm_path(parts.path or "/", absolute=True)
    return urllib.parse.urlunsplit((proto, parts.netloc.lower(), norm, parts.query, ""))
  return f"{proto}://{_norm_path(path, absolute=False)}"


def is_local(uri: str) -> bool:
  """A local path (or file:// URL)."""
  try:
    return not _split(uri)[0]
  except ForbiddenSource:
    return False


def _as_folder(root: str) -> str:
  return root if root.endswith("/") else root + "/"


def input_root(input_uri: str) -> str:
  """The input's own prefix (see the module doc), as a folder URI ending in "/"."""
  m = WILDCARDS.search(input_uri)
  static = input_uri[:m.start()] if m else input_uri
  if m or static.lower().endswith((".parquet", ".pq", ".tar", ".tgz", ".gz", ".bz2", ".xz")):
    static = static[:static.rfind("/") + 1] if "/" in static else ""
  proto, path = _split(static)
  if not proto:
    static = os.path.abspath(path or ".")
  return _as_folder(normalize(static))


def allowed_roots(input_uri: str, allowed_sources: Iterable[str] = ()) -> tuple[str, ...]:
  """The input's own prefix plus every `input.allowed_sources` entry, normalized (local ones absolute)."""
  roots = [input_root(input_uri)]
  for s in allowed_sources:
    proto, path = _split(s)
    roots.append(normalize(os.path.abspath(path)) if not proto else normalize(s))
  return tuple(dict.fromkeys(roots))


def _under(target: str, root: str) -> bool:
  return target == root.rstrip("/") or target.startswith(_as_folder(root))


def _real(path: str) -> str:
  return os.path.realpath(path)


def confine(path: str, shard_uri: str, roots: Sequence[str]) -> str:
  """The URI to read for `path` found in `shard_uri`'s data, or ForbiddenSource when it is not under `roots`."""
  shown = path if len(path) <= SHOWN_CHARS else path[:SHOWN_CHARS] + "…"
  try:
    if SUSPICIOUS.search(path):
      raise ForbiddenSource("backslashes, NULs and percent-encoded '.', '/' or '\\' are not allowed")
    proto, rest = _split(path)
    if not proto and not rest.startswith("/"):
      sproto, spath = _split(shard_uri)
      base = posixpath.dirname(spath)
      path = f"{sproto}://{base}/{rest}" if sproto else posixpath.join(base, rest)
    target = normalize(path)
    local = not _split(target)[0]
    for root in roots:
      if local and not _split(root)[0]:
        if _under(_real(target), _real(root)) and _under(target, root):
          return target
      elif _under(target, root):
        return target
    raise ForbiddenSource(f"not under an allowed source ({', '.join(roots)})")
  except ForbiddenSource as e:
    raise ForbiddenSource(f"image source {shown!r} refused: {e}; allow a prefix with input.allowed_sources") from None


def storage_options_for(source: str, input_uri: str, storage_options: dict | None) -> dict | None:
  """Options to open an allowed `source` with: the input's storage options (credentials) only for sources of
  the input's own protocol, and for http(s) no redirects (an allowed server must not send us elsewhere)."""
  try:
    proto, same = _split(source)[0], _split(source)[0] == _split(input_uri)[0]
  except ForbiddenSource:
    proto, same = "", False
  opts = dict(storage_options or {}) if same else {}
  if proto in ("http", "https"):
    opts["allow_redirects"] = False
  return opts or None
