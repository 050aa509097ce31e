"""`pgbatch publish OUTPUT --iceberg CATALOG.TABLE`: register an output's committed files in an Iceberg table."""
from __future__ import annotations

import json
import sys

HELP = "append an output's committed files to an Apache Iceberg table"


def register(parser) -> None:
  parser.add_argument("output", metavar="OUTPUT", help="the job's output.uri (local folder or gs://…)")
  parser.add_argument("--iceberg", required=True, metavar="CATALOG.TABLE",
                      help="pyiceberg catalog name (from ~/.pyiceberg.yaml or PYICEBERG_CATALOG__<NAME>__*) and "
                           "table (namespace.name; namespace 'default' when omitted)")
  parser.add_argument("--catalog-property", action="append", default=[], metavar="KEY=VALUE",
                      help="catalog property (type, uri, warehouse, ...); repeatable; overrides the config")
  parser.add_argument("--json", action="store_true", help="print the result as JSON")


def _properties(items: list[str]) -> dict:
  out = {}
  for item in items:
    key, sep, value = item.partition("=")
    if not sep or not key:
      raise ValueError(f"--catalog-property {item!r}: expected KEY=VALUE")
    out[key] = value
  return out


def main(args) -> int:
  from pgbatch.publish import publish, split_target
  try:
    props = _properties(args.catalog_property)
    split_target(args.iceberg)
  except ValueError as e:
    print(f"pgbatch publish: {e}", file=sys.stderr)
    return 2
  try:
    import pyiceberg  # noqa: F401  pylint: disable=unused-import,import-outside-toplevel
  except ImportError:
    print("pgbatch publish: needs pyiceberg: pip install 'pgbatch[iceberg]'", file=sys.stderr)
    return 2
  try:
    result = publish(args.output, args.iceberg, props)
  except (ValueError, FileNotFoundError) as e:
    print(f"pgbatch publish: {e}", file=sys.stderr)
    return 2
  if args.json:
    print(json.dumps(result, indent=1))
  else:
    print(f"{result['table']}: {result['added']} file(s) added ({result['rows_added']} rows), "
          f"{result['removed']} replaced or removed, {result['unchanged']} already there; "
          f"snapshot {result['snapshot_id']}")
  return 0
