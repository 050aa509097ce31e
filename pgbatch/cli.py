"""`pgbatch` command line. Each subcommand lives in the module that owns the concern; this file only routes.

A subcommand module exposes `register(parser)` (adds its arguments) and `main(args) -> int`.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS = {
    "demo": ("pgbatch.demo", "build a tiny model and real-photo shards, then run the job on local Ray"),
    "run": ("pgbatch.pipeline", "run a job spec"),
    "validate": ("pgbatch.config", "check a job spec without running it"),
    "inspect": ("pgbatch.inspection", "counts, error reasons and sample rows of an output"),
    "publish": ("pgbatch.publish", "append an output's committed files to an Apache Iceberg table"),
    "submit": ("pgbatch.submit", "submit a job to a Ray cluster (Job Submission API)"),
    "status": ("pgbatch.submit", "status and logs of a submitted job"),
    "models": ("pgbatch.model.configs", "list model variants with parameter counts"),
    "convert": ("pgbatch.checkpoints.convert", "convert big_vision .npz <-> Hugging Face safetensors"),
    "schema": ("pgbatch.schema_docs", "export or show the output contract"),
    "safety": ("pgbatch.safety.cli", "show the resolved safety policy, calibrate thresholds"),
    "bench": ("pgbatch.bench", "engine or pipeline throughput benchmark"),
}


def _importable(module: str) -> bool:
  import importlib.util
  try:
    return importlib.util.find_spec(module) is not None
  except ModuleNotFoundError:
    return False


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="pgbatch", description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
  for name, (module, help_text) in COMMANDS.items():
    p = sub.add_parser(name, help=help_text, description=help_text)
    p.set_defaults(_module=module)
    register = getattr(importlib.import_module(module), f"register_{name}", None) if _importable(module) else None
    if register:
      register(p)
  return parser


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  module = importlib.import_module(args._module)
  try:
    code = int(getattr(module, f"main_{args.command}")(args) or 0)
    sys.stdout.flush()  # a closed pipe surfaces here rather than at interpreter exit
    return code
  except BrokenPipeError:  # `pgbatch schema show | head`: the reader left; not an error worth a traceback
    import os
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


if __name__ == "__main__":
  sys.exit(main())
