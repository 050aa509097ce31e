"""`pgbatch inspect OUTPUT`: counts, error reasons, safety decisions and sample rows of an output."""
from __future__ import annotations

import json
import sys

HELP = "counts, error reasons and sample rows of an output"


def register(parser) -> None:
  parser.add_argument("output", metavar="OUTPUT", help="the job's output.uri (local folder or gs://…)")
  parser.add_argument("--rows", type=int, default=3, help="sample rows to show (default 3)")
  parser.add_argument("--json", action="store_true", help="print the report as JSON")
  parser.add_argument("--html", metavar="REPORT.html",
                      help="also write a self-contained HTML contact sheet (thumbnails with boxes, masks, texts)")
  parser.add_argument("--html-rows", type=int, default=200, help="rows shown in the HTML report (default 200)")
  parser.add_argument("--job", metavar="JOB.yaml",
                      help="the job spec that wrote OUTPUT: also check its input exactly once (duplicate keys, "
                           "listed images not in the output, changed shards)")


def main(args) -> int:
  from pgbatch.inspection import format_report, summarize
  job = {}
  if args.job:
    from pgbatch import config
    try:
      spec = config.load(args.job)
    except config.JobSpecError as e:
      print(str(e), file=sys.stderr)
      return 2
    job = dict(input_uri=spec.input.uri, input_format=spec.input.format,
               input_storage_options=dict(spec.input.storage_options) or None)
  try:
    rep = summarize(args.output, rows=args.rows, **job)
  except FileNotFoundError as e:
    print(f"pgbatch inspect: {args.output}: not found ({e})", file=sys.stderr)
    return 2
  except ValueError as e:   # readers.InputError: the job's input lists nothing
    print(f"pgbatch inspect: {args.output}: {e}", file=sys.stderr)
    return 2
  print(json.dumps(rep, indent=1, default=str) if args.json else format_report(rep))
  if args.html and rep["shards"]:
    from pgbatch import report
    print(f"html report: {report.write_html(args.output, args.html, limit=args.html_rows)}")
  return 0 if rep["shards"] else 1
