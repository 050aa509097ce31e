"""`pgbatch validate JOB.yaml…`: check job specs without running them (no JAX, no Ray)."""
from __future__ import annotations

import sys

from pgbatch.cli.args import add_override_args

HELP = "check a job spec and what running it needs (input, output, model files) without running it"


def register(parser) -> None:
  parser.add_argument("jobs", nargs="+", metavar="JOB.yaml", help="job spec(s) to check")
  add_override_args(parser)
  parser.add_argument("--show", action="store_true", help="print the resolved spec (defaults filled in)")
  parser.add_argument("--inputs", action="store_true", help="also print the first input shards the glob matches")
  parser.add_argument("--timeout", type=float, default=60.0, metavar="S",
                      help="give up listing the input, looking up the output or reading a model header after S "
                      "seconds each (default 60)")
  parser.add_argument("--spec-only", action="store_true",
                      help="check the spec alone (and, with --inputs, list the input): not the output or model files")
  parser.epilog = ("Spec shape: name, input {uri, format, image_column, key_column, files_per_shard, "
                   "storage_options, allowed_sources}, "
                   "output {uri}, model {checkpoint, tokenizer, variant, dtype, vae}, tasks [{name, kind, ...}], "
                   "resources {accelerator, actors, chips_per_actor, batch_size, ...}, decode {max_pixels, "
                   "max_decoded_bytes, batch_size}, safety {...}. ${VAR} only in uris, storage_options, model paths. "
                   "Env overrides: PGBATCH__SECTION__FIELD=value.")


def main(args) -> int:
  """Exit 0 when every job is ready to run, 2 when any spec, input, output or model problem was found (as `run`):
  one line per problem, `<job>: <field>: <message>` (spec problems: JobSpecError's list)."""
  from pgbatch import preflight
  from pgbatch.config import JobSpecError, load
  from pgbatch.redact import redact_uri
  bad = 0
  for job in args.jobs:
    try:
      spec = load(job, args.overrides)
    except JobSpecError as e:
      print(str(e), file=sys.stderr)
      bad += 1
      continue
    shards: list = []
    problems: list[tuple[str, str]] = []
    if not args.spec_only or args.inputs:
      problems, shards = preflight.check_input(spec, args.timeout)
    if not args.spec_only:
      problems += preflight.check_output(spec, args.timeout) + preflight.check_model(spec, args.timeout)
    if problems:
      for field, problem in problems:
        print(f"{job}: {field}: {problem}", file=sys.stderr)
      bad += 1
      continue
    kinds = ", ".join(f"{t.name} ({t.kind})" for t in spec.tasks)
    checked = ("spec" + (f", {len(shards)} input shard(s)" if args.inputs else "") if args.spec_only
               else f"{len(shards)} input shard(s), output writable, model readable")
    print(f"{job}: ok — job {spec.name!r}, {spec.input.format} from {redact_uri(spec.input.uri)} → "
          f"{redact_uri(spec.output.uri)}; "
          f"tasks: {kinds}; {spec.resources.actors} {spec.resources.accelerator} actor(s); checked: {checked}")
    if args.inputs:
      print(f"  {len(shards)} input shard(s): " + ", ".join(s.id for s in shards[:3]) + (" …" if len(shards) > 3 else ""))
    if args.show:
      print(spec.to_yaml())
  return 2 if bad else 0  # 2: a bad spec, input, output or model (see pgbatch.errors)
