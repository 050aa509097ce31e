"""Checkpoint errors: every failure is a CheckpointError whose message names the URI or key."""
from __future__ import annotations


class CheckpointError(Exception):
  """Base class: anything wrong with a checkpoint, with a message that names the URI or key."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
  pass


class UnknownFormatError(CheckpointError):
  pass


class CorruptCheckpointError(CheckpointError):
  """Truncated or damaged file (bad zip, bad npy/safetensors header, short read, CRC mismatch)."""


class MissingKeyError(CheckpointError):
  pass


class UnexpectedKeyError(CheckpointError):
  pass


class ShapeMismatchError(CheckpointError):
  pass


def corrupt(uri: str, reason: str) -> CorruptCheckpointError:
  return CorruptCheckpointError(f"checkpoint {uri} is corrupt or truncated: {reason}")

