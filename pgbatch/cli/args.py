"""Arguments shared by several commands."""
from __future__ import annotations


def add_override_args(parser) -> None:
  parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE",
                      help="override a field, e.g. --set resources.batch_size=32 --set tasks[0].lang=de")


def positive_int(v: str) -> int:
  import argparse
  if not v.isdigit() or int(v) < 1:
    raise argparse.ArgumentTypeError(f"expected a positive integer, got {v!r}")
  return int(v)
