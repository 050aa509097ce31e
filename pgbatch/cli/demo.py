"""`pgbatch demo`: a tiny random-weight model and real photographs, run end to end on local Ray."""
from __future__ import annotations

from pgbatch import demo

HELP = "build a tiny model and real-photo shards, then run the job on local Ray"


def register(parser) -> None:
  parser.add_argument("--workdir", default=demo.DEFAULT_WORKDIR,
                      help=f"where model, shards, job.yaml and output go (default: ./{demo.DEFAULT_WORKDIR})")
  parser.add_argument("--no-progress", action="store_true", help="no progress line on stderr")


def main(args) -> int:
  return demo.run_demo(args.workdir, progress=not args.no_progress)
