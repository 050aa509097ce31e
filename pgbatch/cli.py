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
  from pgbatch import errors
  parser = argparse.ArgumentParser(prog="pgbatch", description=__doc__.splitlines()[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog="Exit status" + errors.__doc__.split("Exit status", 1)[1])
  parser.add_argument("--debug", action="store_true",
                      help="tracebacks and debug logs (also accepted anywhere after the command)")
  sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
  for name, (module, help_text) in COMMANDS.items():
    p = sub.add_parser(name, help=help_text, description=help_text)
    p.set_defaults(_module=module)
    register = getattr(importlib.import_module(module), f"register_{name}", None) if _importable(module) else None
    if register:
      register(p)
  return parser


def main(argv: list[str] | None = None) -> int:
  from pgbatch import errors
  argv = list(sys.argv[1:] if argv is None else argv)
  debug = "--debug" in argv
  argv = [a for a in argv if a != "--debug"]
  args = build_parser().parse_args(argv)
  errors.configure_logging(debug)
  try:
    module = importlib.import_module(args._module)
    code = int(getattr(module, f"main_{args.command}")(args) or 0)
    sys.stdout.flush()  # a closed pipe surfaces here rather than at interpreter exit
    _stop_ray()  # here, not in Ray's atexit hook, so that a Ctrl-C while it stops is handled below
    return code
  except BrokenPipeError:  # `pgbatch schema show | head`: the reader left; not an error worth a traceback
    import os
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0
  except KeyboardInterrupt:
    if debug:
      raise
    _stop_ray()
    print(f"pgbatch {args.command}: interrupted; what was committed stays (rerun the same command to resume)",
          file=sys.stderr)
    return errors.INTERRUPTED
  except Exception as e:  # noqa: BLE001 - the one-line report of anything a command did not expect
    if debug:
      raise
    print(f"pgbatch {args.command}: {type(e).__name__}: {errors.one_line(e)} (--debug for the traceback)",
          file=sys.stderr)
    return errors.PARTIAL


def _stop_ray() -> None:
  """A clean stop after Ctrl-C: the local Ray this process started goes down with its workers."""
  ray = sys.modules.get("ray")
  if ray is not None and ray.is_initialized():
    try:
      ray.shutdown()
    except BaseException:  # noqa: BLE001 - a second Ctrl-C while stopping: leave the rest to the OS
      pass


if __name__ == "__main__":
  sys.exit(main())
