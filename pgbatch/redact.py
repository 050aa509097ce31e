"""Credential-looking values out of what we print, log and write.

    print(yaml.safe_dump(redact(spec.model_dump(mode="json"))))   # validate --show
    provenance["checkpoint_uri"] = redact_uri(spec.model.checkpoint)
    install_log_filter(secrets_in(tree))                           # every log line, by value

Credential-looking: a mapping key named like a credential (`token`, `key`, `secret`, `password`, `credentials`,
`private_key`, `X-Goog-Signature`, ... matched on its last `_`/`-`/`.` separated part); a string holding a
private key or service-account JSON; a URI's userinfo password and its credential-named query parameters
(signed URLs). Pure functions; no pgbatch imports.
"""
from __future__ import annotations

import logging
import re
import urllib.parse
from typing import Any, Iterable

REDACTED = "<redacted>"
SECRET_NAME = re.compile(r"(^|[_\-.])(token|key|secret|password|passwd|pwd|credentials?|auth|signature|sig|"
                         r"private_key|api_key|access_key|secret_key|session_token|authorization|cookie|connection_string)$", re.I)
SECRET_TEXT = re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----|\"private_key\"\s*:|\"type\"\s*:\s*\"service_account\"")
MIN_SECRET_CHARS = 4  # shorter values are not hunted for in log lines (they would redact ordinary words)


def is_secret_name(name: Any) -> bool:
  return isinstance(name, str) and bool(SECRET_NAME.search(name))


def redact_uri(uri: str) -> str:
  """`https://u:pw@h/p?X-Goog-Signature=…&a=1` → `https://u:<redacted>@h/p?X-Goog-Signature=<redacted>&a=1`."""
  if "://" not in uri or not ("@" in uri or "?" in uri):
    return uri
  try:
    parts = urllib.parse.urlsplit(uri)
  except ValueError:
    return uri
  netloc = parts.netloc
  if "@" in netloc:
    user, _, host = netloc.rpartition("@")
    netloc = (user.split(":", 1)[0] + ":" + REDACTED if ":" in user else REDACTED) + "@" + host
  query = "&".join(
      f"{k}={REDACTED}" if is_secret_name(urllib.parse.unquote(k)) else (f"{k}={v}" if sep else k)
      for k, sep, v in (q.partition("=") for q in parts.query.split("&") if q)) if parts.query else ""
  return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact(node: Any) -> Any:
  """A copy of a JSON-like tree with credential-looking values replaced by REDACTED."""
  if isinstance(node, dict):
    return {k: (REDACTED if is_secret_name(k) and v not in (None, "", {}, [])
                and not isinstance(v, bool) else redact(v)) for k, v in node.items()}
  if isinstance(node, list):
    return [redact(v) for v in node]
  if isinstance(node, str):
    return REDACTED if SECRET_TEXT.search(node) else redact_uri(node)
  return node


def secrets_in(node: Any, _secret: bool = False) -> set[str]:
  """Every string value that `redact` hides (whole values and URI passwords/credential parameters)."""
  out: set[str] = set()
  if isinstance(node, dict):
    for k, v in node.items():
      out |= secrets_in(v, _secret or is_secret_name(k))
  elif isinstance(node, list):
    for v in node:
      out |= secrets_in(v, _secret)
  elif isinstance(node, (str, int, float)) and not isinstance(node, bool):
    text = str(node)
    if _secret or (isinstance(node, str) and SECRET_TEXT.search(text)):
      out.add(text)
    elif isinstance(node, str) and redact_uri(text) != text:
      parts = urllib.parse.urlsplit(text)
      if parts.password:
        out.add(parts.password)
      out |= {v for k, v in urllib.parse.parse_qsl(parts.query) if is_secret_name(k)}
  return {s for s in out if len(s) >= MIN_SECRET_CHARS}


class RedactingFilter(logging.Filter):
  """Replaces known secret values in every record's message (args merged in first)."""

  def __init__(self, secrets: Iterable[str]):
    super().__init__()
    self.secrets = sorted(set(secrets), key=len, reverse=True)

  def filter(self, record: logging.LogRecord) -> bool:
    if not self.secrets:
      return True
    msg = record.getMessage()
    clean = msg
    for s in self.secrets:
      clean = clean.replace(s, REDACTED)
    if clean != msg:
      record.msg, record.args = clean, None
    if record.exc_info and record.exc_info[1] is not None and not record.exc_text:
      text = logging.Formatter().formatException(record.exc_info)
      for s in self.secrets:
        text = text.replace(s, REDACTED)
      record.exc_text, record.exc_info = text, None
    return True


def install_log_filter(secrets: Iterable[str]) -> RedactingFilter:
  """Adds a RedactingFilter to every handler of the root logger (and to the lastResort handler)."""
  flt = RedactingFilter(secrets)
  for h in logging.getLogger().handlers + [logging.lastResort]:
    if h is not None:
      h.addFilter(flt)
  return flt
