"""`pgbatch publish OUTPUT --iceberg CATALOG.TABLE`: the committed Parquet files of an output, as an Iceberg table.

The files are registered where they lie (Iceberg `add_files`: no copy, no rewrite); the table's schema is the
output contract (`pgbatch.schema`, published under schemas/) of the tasks recorded in the files. What is
committed is what the manifest (`OUTPUT/_manifest/`) lists, so a running or killed job's uncommitted files are
never published. Idempotent: a file already in the table (same path and size) is not added again; a committed
shard rewritten since (same path, other size) replaces its old entry, and a file of this output that is no
longer committed leaves the table, all in one Iceberg snapshot. Other outputs' files in the table are left alone.

The catalog is pyiceberg's: CATALOG names an entry of `~/.pyiceberg.yaml` or of `PYICEBERG_CATALOG__<NAME>__*`
environment variables (type sql / rest / glue / ..., uri, warehouse, credentials), completed or overridden by
`--catalog-property KEY=VALUE`. TABLE is `namespace.name` (`name` alone: namespace `default`).
"""
from __future__ import annotations

import posixpath

from pgbatch import schema as schema_lib
from pgbatch import tasks as tasks_lib
from pgbatch.io import sink as sink_lib

DEFAULT_NAMESPACE = "default"
# Full min/max of the shard column (not Iceberg's 16-character truncation): filters on shard URIs prune files.
TABLE_PROPERTIES = {"write.metadata.metrics.column.shard": "full", "pgbatch.schema": schema_lib.SCHEMA_NAME}


def split_target(target: str) -> tuple[str, tuple[str, str]]:
  """"lake.annotations.nightly" -> ("lake", ("annotations", "nightly")); "lake.nightly" -> ("lake", ("default", "nightly"))."""
  parts = target.split(".")
  if len(parts) < 2 or not all(parts):
    raise ValueError(f"--iceberg {target!r}: expected CATALOG.TABLE or CATALOG.NAMESPACE.TABLE")
  catalog, rest = parts[0], parts[1:]
  if len(rest) == 1:
    rest = [DEFAULT_NAMESPACE] + rest
  return catalog, (".".join(rest[:-1]), rest[-1])


def iceberg_path(uri: str) -> str:
  """A manifest `file` as Iceberg wants it: a URI with a scheme (local paths become file:///...)."""
  return uri if "://" in uri else "file://" + uri


def contract_schema(entries: list[dict], storage_options: dict | None = None):
  """The Arrow output schema of the committed files: the contract of the tasks the files record, checked
  against every file's own schema (fields and types; docs and metadata aside)."""
  import fsspec
  import pyarrow.parquet as pq
  expected, tasks_json = None, None
  for e in entries:
    fs, path = fsspec.core.url_to_fs(e["file"], **(storage_options or {}))
    with fs.open(path, "rb") as f:
      got = pq.read_schema(f)
    meta = got.metadata or {}
    if meta.get(schema_lib.META_VERSION) != schema_lib.SCHEMA_VERSION.encode():
      raise ValueError(f"{e['file']}: schema version {meta.get(schema_lib.META_VERSION)!r}, this pgbatch "
                       f"publishes {schema_lib.SCHEMA_NAME}")
    if expected is None:
      tasks_json = meta.get(schema_lib.META_TASKS)
      expected = schema_lib.output_schema(tasks_lib.tasks_of(got))
    elif meta.get(schema_lib.META_TASKS) != tasks_json:
      raise ValueError(f"{e['file']}: its tasks differ from {entries[0]['file']}'s; publish one job's output "
                       "per table")
    if not got.remove_metadata().equals(expected.remove_metadata(), check_metadata=False):
      raise ValueError(f"{e['file']}: columns differ from the {schema_lib.SCHEMA_NAME} contract")
  return expected


def _load_table(catalog, ident: tuple[str, str], schema):
  """The table, created (with its namespace) from the contract when missing; new task columns are added."""
  from pyiceberg.exceptions import NamespaceAlreadyExistsError, NoSuchTableError
  try:
    table = catalog.load_table(ident)
  except NoSuchTableError:
    try:
      catalog.create_namespace(ident[0])
    except NamespaceAlreadyExistsError:
      pass
    return catalog.create_table(ident, schema=schema, properties=TABLE_PROPERTIES)
  if set(schema.names) - {f.name for f in table.schema().fields}:
    with table.update_schema() as update:
      update.union_by_name(schema)
  return table


def plan(table, output_root: str, committed: dict[str, dict]) -> tuple[list, list[str]]:
  """(data files of the table to remove, file paths to add): see the module doc."""
  in_table = {t.file.file_path: t.file for t in table.scan().plan_files()} if table.current_snapshot() else {}
  want = {iceberg_path(e["file"]): e for e in committed.values()}
  prefix = iceberg_path(output_root).rstrip("/") + "/"
  remove = [df for path, df in sorted(in_table.items())
            if path.startswith(prefix) and posixpath.dirname(path) + "/" == prefix
            and (path not in want or df.file_size_in_bytes != want[path]["size"])]
  removed = {df.file_path for df in remove}
  add = sorted(p for p in want if p not in in_table or p in removed)
  return remove, add


def publish(output_uri: str, target: str, catalog_properties: dict | None = None,
            storage_options: dict | None = None, attempts: int = 3) -> dict:
  """Publishes the committed files of `output_uri` to the Iceberg table `target` (see the module doc).
  Returns {"table", "added", "removed", "unchanged", "rows_added", "snapshot_id"}."""
  from pyiceberg.catalog import load_catalog
  from pyiceberg.exceptions import CommitFailedException
  from pyiceberg.io.pyarrow import parquet_file_to_data_file
  from pyiceberg.table import TableProperties
  name, ident = split_target(target)
  s = sink_lib.Sink(output_uri, None, storage_options)
  committed = s.committed()
  if not committed:
    raise ValueError(f"{output_uri}: no committed shards to publish")
  schema = contract_schema([committed[k] for k in sorted(committed)], storage_options)
  catalog = load_catalog(name, **(catalog_properties or {}))
  root = s.uri(s.root)
  for attempt in range(attempts):
    table = _load_table(catalog, ident, schema)
    remove, add = plan(table, root, committed)
    if not remove and not add:
      return {"table": ".".join(ident), "added": 0, "removed": 0, "unchanged": len(committed), "rows_added": 0,
              "snapshot_id": table.current_snapshot().snapshot_id}
    props = {"pgbatch.output": root, "pgbatch.shards-added": str(len(add)),
             "pgbatch.shards-removed": str(len(remove))}
    try:
      with table.transaction() as tx:
        if tx.table_metadata.name_mapping() is None:
          tx.set_properties(**{TableProperties.DEFAULT_NAME_MAPPING:
                               tx.table_metadata.schema().name_mapping.model_dump_json()})
        update = tx.update_snapshot(snapshot_properties=props)
        with (update.overwrite() if remove else update.fast_append()) as snap:
          for df in remove:
            snap.delete_data_file(df)
          for path in add:   # reads each footer: schema checked against the table, column stats for pruning
            snap.append_data_file(parquet_file_to_data_file(table.io, tx.table_metadata, path))
    except CommitFailedException:
      if attempt + 1 == attempts:
        raise
      continue   # another publisher committed first: plan again against the new snapshot
    table = catalog.load_table(ident)
    rows = int(table.current_snapshot().summary.additional_properties.get("added-records", 0))
    return {"table": ".".join(ident), "added": len(add), "removed": len(remove),
            "unchanged": len(committed) - len(add), "rows_added": rows,
            "snapshot_id": table.current_snapshot().snapshot_id}
  raise AssertionError("unreachable")
