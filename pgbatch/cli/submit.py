"""`pgbatch submit JOB.yaml`: submit a job to a Ray cluster (Job Submission API); the spec is validated first."""
from __future__ import annotations

import sys

from pgbatch import submit

HELP = "submit a job to a Ray cluster (Job Submission API)"


def add_address_arg(parser) -> None:
  parser.add_argument("--address", default=None,
                      help=f"Ray dashboard address (default: $RAY_ADDRESS or {submit.DEFAULT_ADDRESS})")


def register(parser) -> None:
  parser.add_argument("job", help="job spec (YAML)")
  add_address_arg(parser)
  parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="override a spec field (repeatable); validated here, forwarded to the run")
  parser.add_argument("--env", dest="env_mode", choices=("image", "pip", "local"), default="pip",
                      help="how pgbatch reaches the cluster: the image has it | this wheel + pinned deps "
                           "(default) | this source folder, dependencies already there")
  parser.add_argument("--submission-id", default=None, help="job id to use (default: Ray picks one)")
  parser.add_argument("--follow", action="store_true", help="stream logs until the job ends")
  parser.add_argument("--dry-run", action="store_true",
                      help="validate and print the upload list (working-dir path, local file, size, spec field)")


def main(args) -> int:
  try:
    if getattr(args, "dry_run", False):
      submit.dry_run(args.job, args.overrides, args.env_mode)
      return 0
    job_id = submit.submit(args.job, args.address, args.overrides, args.env_mode, args.submission_id)
  except (ValueError, ConnectionError) as e:
    print(f"pgbatch submit: {e}", file=sys.stderr)
    return 2
  print(job_id, flush=True)
  if not args.follow:
    return 0
  status = submit.follow(args.address, job_id)
  print(f"{job_id}: {status}", file=sys.stderr)
  return 0 if status == "SUCCEEDED" else 1
