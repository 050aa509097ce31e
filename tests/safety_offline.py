"""No-network guard for the safety tests: every socket connect / DNS lookup raises, so a filter that tries to
download a model, a word list or a suffix list fails the test instead of silently reaching out."""
from __future__ import annotations

import contextlib
import socket
from typing import Iterator

import pytest


@contextlib.contextmanager
def no_network() -> Iterator[list]:
  """Blocks socket connects and name resolution; yields the list of attempted destinations."""
  attempts: list = []

  def refuse(*a, **k):
    attempts.append(a[1:] if a else k)
    raise AssertionError(f"network access attempted: {a[1:] if a else k}")

  mp = pytest.MonkeyPatch()
  mp.setattr(socket.socket, "connect", refuse)
  mp.setattr(socket.socket, "connect_ex", refuse)
  mp.setattr(socket, "create_connection", refuse)
  mp.setattr(socket, "getaddrinfo", refuse)
  try:
    yield attempts
  finally:
    mp.undo()
