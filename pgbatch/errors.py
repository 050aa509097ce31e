"""User-facing failures: one line each, a documented exit status, tracebacks only with `--debug`.

Exit status of every `pgbatch` command:
  0    done
  1    a run that committed less than everything (rerun the same command to resume), or an unexpected error
  2    a bad job spec, input, output or model: nothing was done; the line names the field or file
  130  interrupted (Ctrl-C) after a clean stop: what was committed stays, a rerun resumes
"""
from __future__ import annotations

import logging
import sys
import threading
from typing import Callable, TypeVar

T = TypeVar("T")
OK, PARTIAL, BAD_INPUT, INTERRUPTED = 0, 1, 2, 130
# Libraries that log their own retries and tracebacks for errors we report in one line anyway.
NOISY_LOGGERS = ("gcsfs", "fsspec", "aiohttp", "urllib3", "google", "botocore", "s3fs", "asyncio")
MAX_LINE = 500


class OutputError(ValueError):
  """output.uri cannot be used as the output folder (a file, under a file, unreachable)."""


def one_line(e: BaseException, limit: int = MAX_LINE) -> str:
  """`str(e)` (or its type when empty) on one line, cut at `limit` characters."""
  text = " ".join(str(e).split()) or type(e).__name__
  return text if len(text) <= limit else text[:limit] + "…"


class _OneLineFormatter(logging.Formatter):
  """A record's message on one line, without its traceback."""

  def format(self, record: logging.LogRecord) -> str:
    saved = record.exc_info, record.exc_text, record.stack_info
    record.exc_info = record.exc_text = record.stack_info = None
    try:
      return " ".join(super().format(record).split("\n"))
    finally:
      record.exc_info, record.exc_text, record.stack_info = saved


class _StderrHandler(logging.StreamHandler):
  """Writes to whatever `sys.stderr` is at the time of the record (tests and tools swap it)."""

  @property
  def stream(self):
    return sys.stderr

  @stream.setter
  def stream(self, _value):
    pass


def configure_logging(debug: bool) -> None:
  """Root logging for a command: with `debug`, pgbatch's DEBUG records and every traceback; otherwise warnings
  and up, one line each, and the libraries in NOISY_LOGGERS quiet (their failures reach us as exceptions).
  Idempotent: the handler is installed once per process and reconfigured on each call."""
  root = logging.getLogger()
  handler = next((h for h in root.handlers if isinstance(h, _StderrHandler)), None)
  if handler is None:
    handler = _StderrHandler()
    root.addHandler(handler)
  fmt = "%(levelname)s %(name)s: %(message)s"
  handler.setFormatter(logging.Formatter("%(asctime)s " + fmt) if debug else _OneLineFormatter(fmt))
  logging.getLogger("pgbatch").setLevel(logging.DEBUG if debug else logging.NOTSET)
  for name in NOISY_LOGGERS:
    logging.getLogger(name).setLevel(logging.NOTSET if debug else logging.CRITICAL)


def report(prefix: str, e: BaseException) -> None:
  """Prints `prefix: <one line of e>` on stderr; with --debug also the traceback (pgbatch logger, DEBUG)."""
  print(f"{prefix}: {one_line(e, limit=2000)}", file=sys.stderr)
  logging.getLogger("pgbatch").debug("%s: traceback", prefix, exc_info=e)


def call_with_deadline(fn: Callable[[], T], seconds: float) -> T:
  """`fn()`, or TimeoutError after `seconds` (the call goes on in a daemon thread that exit does not wait for:
  for listings that retry an unreachable endpoint for minutes)."""
  box: dict = {}

  def target():
    try:
      box["value"] = fn()
    except BaseException as e:  # noqa: BLE001 - re-raised in the caller
      box["error"] = e
  t = threading.Thread(target=target, daemon=True, name="pgbatch-deadline")
  t.start()
  t.join(seconds)
  if t.is_alive():
    raise TimeoutError(f"no answer within {seconds:g} s")
  if "error" in box:
    raise box["error"]
  return box["value"]
