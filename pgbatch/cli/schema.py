"""`pgbatch schema export|show`: the published output contract, or the Arrow schema of one job."""
from __future__ import annotations

import json
import sys

from pgbatch.cli.args import add_override_args

HELP = "export or show the output contract"


def register(parser) -> None:
  sub = parser.add_subparsers(dest="schema_command", required=True, metavar="ACTION")
  p = sub.add_parser("export", help="write schemas/annotations.v*.{json,md} for the canonical job")
  p.add_argument("--out", default="schemas", help="output directory (default: schemas)")
  p = sub.add_parser("show", help="print the Arrow output schema with field docs")
  p.add_argument("--job", help="job spec YAML whose tasks to use (default: the canonical job)")
  add_override_args(p)
  p.add_argument("--format", choices=("tree", "json"), default="tree", help="tree (Arrow) or JSON Schema")


def main(args) -> int:
  from pgbatch import config, tasks as tasks_lib
  from pgbatch.schema import output_schema
  from pgbatch.schema_docs import canonical_tasks, describe, export, json_schema
  if args.schema_command == "export":
    for path in export(args.out):
      print(path)
    return 0
  tasks = canonical_tasks()
  if args.job:
    try:
      spec = config.load_partial(args.job, args.overrides)
    except config.JobSpecError as e:
      print(str(e), file=sys.stderr)
      return 2
    tasks = [tasks_lib.make_task(d) for d in spec.get("tasks") or []]
  if args.format == "json":
    print(json.dumps(json_schema(tasks), indent=2, ensure_ascii=False))
  else:
    print(describe(output_schema(tasks)))
  return 0
