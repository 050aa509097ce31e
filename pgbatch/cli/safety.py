"""`pgbatch safety show [--job JOB.yaml]` and `pgbatch safety calibrate OUTPUT`."""
from __future__ import annotations

import sys

from pgbatch.cli.args import add_override_args, positive_int

HELP = "show the resolved safety policy, calibrate thresholds"


def register(parser) -> None:
  sub = parser.add_subparsers(dest="safety_command", required=True, metavar="SUBCOMMAND")
  show = sub.add_parser("show", help="print the resolved safety policy (defaults merged with a job's safety block)")
  show.add_argument("--job", help="job spec YAML whose `safety:` block is merged over the defaults")
  add_override_args(show)
  cal = sub.add_parser("calibrate", help="score histograms per filter/category from an output dir of Parquet files")
  cal.add_argument("output", metavar="OUTPUT", help="output dir (any fsspec URL)")
  cal.add_argument("--bins", type=positive_int, default=10, help="equal-width bins over [0, 1] (default 10)")
  cal.add_argument("--by-field", action="store_true", help="one histogram per scored column too")
  cal.add_argument("--job", help="job spec YAML: mark its thresholds (default: the shipped policy's)")


def load_policy(job: str | None, overrides=()):
  """Policy from a job spec's `safety:` block (any fsspec URL; environment and --set overrides applied), or
  the defaults."""
  from pgbatch import config
  from pgbatch.safety.policy import SafetyPolicy
  if not job:
    return SafetyPolicy.default()
  return SafetyPolicy.model_validate(config.load_partial(job, overrides).get("safety"))


def main(args) -> int:
  from pydantic import ValidationError

  from pgbatch.config import JobSpecError
  from pgbatch.safety.calibrate import format_histograms, group_scores, parquet_files, read_scores, show_text
  try:
    policy = load_policy(getattr(args, "job", None), getattr(args, "overrides", ()))
  except ValidationError as e:
    print(f"invalid safety policy:\n{e}", file=sys.stderr)
    return 2
  except JobSpecError as e:
    print(str(e), file=sys.stderr)
    return 2
  if args.safety_command == "show":
    print(show_text(policy), end="")
    return 0
  if not parquet_files(args.output)[1]:
    print(f"no Parquet files under {args.output}", file=sys.stderr)
    return 1
  groups = group_scores(read_scores(args.output), args.by_field)
  print(format_histograms(groups, args.bins, policy))
  return 0
