"""`pgbatch` command line: one module per command under `pgbatch.cli`; this file only routes.

A command module has `HELP` (one line), `register(parser)` (adds its arguments; imports nothing heavy) and
`main(args) -> int`, which imports what the command needs when it runs: `pgbatch --help` and
`pgbatch validate` never import JAX or Ray. Core modules never parse arguments; nothing imports this package.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# command name -> module under pgbatch.cli
COMMANDS = {
    "demo": "demo", "run": "run", "validate": "validate", "inspect": "inspect_output", "publish": "publish",
    "submit": "submit", "status": "status", "models": "models", "convert": "convert", "schema": "schema",
    "safety": "safety", "bench": "bench",
}


def command_module(name: str):
  return importlib.import_module(f"{__name__}.{COMMANDS[name]}")


def build_parser() -> argparse.ArgumentParser:
  from pgbatch import errors
  parser = argparse.ArgumentParser(prog="pgbatch", description=__doc__.splitlines()[0].split(":")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog="Exit status" + errors.__doc__.split("Exit status", 1)[1])
  parser.add_argument("--debug", action="store_true",
                      help="tracebacks and debug logs (also accepted anywhere after the command)")
  sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
  for name in COMMANDS:
    module = command_module(name)
    p = sub.add_parser(name, help=module.HELP, description=module.HELP)
    module.register(p)
  return parser


def main(argv: list[str] | None = None) -> int:
  from pgbatch import errors
  argv = list(sys.argv[1:] if argv is None else argv)
  debug = "--debug" in argv
  argv = [a for a in argv if a != "--debug"]
  args = build_parser().parse_args(argv)
  errors.configure_logging(debug)
  try:
    code = int(command_module(args.command).main(args) or 0)
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
