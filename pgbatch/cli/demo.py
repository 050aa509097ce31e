"""`pgbatch demo`: the shipped DEMO model and photographs, run end to end on local Ray."""
from __future__ import annotations

from pgbatch import demo

HELP = "run caption, OCR, detect and segment with a tiny DEMO model on photographs, on local Ray"


def register(parser) -> None:
  parser.add_argument("--workdir", default=demo.DEFAULT_WORKDIR,
                      help=f"where model, shards, job.yaml and output go (default: ./{demo.DEFAULT_WORKDIR})")
  parser.add_argument("--fresh", action="store_true",
                      help="delete an earlier demo output first (default: resume it, skipping committed shards)")
  parser.add_argument("--no-progress", action="store_true", help="no progress line on stderr")


def main(args) -> int:
  return demo.run_demo(args.workdir, progress=not args.no_progress, fresh=args.fresh)
