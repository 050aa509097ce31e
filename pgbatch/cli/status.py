"""`pgbatch status JOB_ID`: status and logs of a submitted job."""
from __future__ import annotations

import sys

from pgbatch import submit
from pgbatch.cli.submit import add_address_arg

HELP = "status and logs of a submitted job"


def register(parser) -> None:
  parser.add_argument("job_id", help="id printed by `pgbatch submit`")
  add_address_arg(parser)
  parser.add_argument("--logs", action="store_true", help="print the logs so far")
  parser.add_argument("--follow", action="store_true", help="stream logs until the job ends")
  parser.add_argument("--wait", action="store_true", help="block until the job ends; exit 0 only if it succeeded")


def main(args) -> int:
  try:
    c = submit.client(args.address)
    info = c.get_job_info(args.job_id)
  except (RuntimeError, ConnectionError) as e:  # unknown id (HTTP 404) / no Ray head there
    print(f"pgbatch status: {args.job_id}: {e}", file=sys.stderr)
    return 2
  if args.logs:
    print(c.get_job_logs(args.job_id), end="")
  status = submit.follow(args.address, args.job_id) if args.follow else (
      submit.wait(args.address, args.job_id) if args.wait else str(info.status.value))
  message = c.get_job_info(args.job_id).message or ""
  print(f"{args.job_id}\t{status}\t{message}".rstrip())
  if args.follow or args.wait:
    return 0 if status == "SUCCEEDED" else 1
  return 1 if status in ("FAILED", "STOPPED") else 0
