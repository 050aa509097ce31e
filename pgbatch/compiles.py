"""Counts this process's XLA compiles: every backend compile JAX reports (jax.monitoring), whoever caused it.

    compiles.install()          # once per process (idempotent)
    n = compiles.count()        # compiles so far in this process
    compiles.since(n)           # [(program name, seconds)] compiled after the count was n

Each compile is logged at DEBUG with its program name and seconds; the Engine logs the ones that happen
mid-job (after its warm-up) as warnings. A compile served by the persistent compilation cache is no compile.
"""
from __future__ import annotations

import logging
import threading

log = logging.getLogger(__name__)

BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_lock = threading.Lock()
_events: list[tuple[str, float]] = []   # (program name, seconds), in order
_installed = False


def _on_event(event: str, seconds: float, **meta) -> None:
  if event != BACKEND_COMPILE_EVENT:
    return
  name = str(meta.get("fun_name", "?"))
  with _lock:
    _events.append((name, float(seconds)))
  log.debug("XLA compile: %s in %.2f s", name, seconds)


def install() -> None:
  """Starts counting (idempotent). Compiles before the first call are not counted."""
  global _installed
  import jax
  with _lock:
    if _installed:
      return
    _installed = True
  jax.monitoring.register_event_duration_secs_listener(_on_event)


def count() -> int:
  with _lock:
    return len(_events)


def since(n: int) -> list[tuple[str, float]]:
  """The compiles after the n-th: [(program name, seconds)]."""
  with _lock:
    return list(_events[n:])
