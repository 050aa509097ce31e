"""`pgbatch inspect OUTPUT`: what a job wrote — counts, error reasons, safety decisions, a few sample rows.

Counts come from the manifest (`OUTPUT/_manifest/*.json`, one entry per committed shard), so they are cheap
for any output size; sample rows and example error messages are read from a few committed Parquet files.
Files not covered by a valid manifest entry (a run still going, or killed) are reported, never counted.
"""
from __future__ import annotations

import collections
import json
from typing import Any, Optional


def _fs(uri: str, storage_options: Optional[dict] = None):
  import fsspec
  return fsspec.core.url_to_fs(uri, **(storage_options or {}))


def read_file(uri: str, columns: Optional[list[str]] = None, storage_options: Optional[dict] = None):
  """One Parquet file (local path or URL) as a pyarrow Table."""
  import pyarrow.parquet as pq
  fs, path = _fs(uri, storage_options)
  from fsspec.implementations.local import LocalFileSystem
  if isinstance(fs, LocalFileSystem):
    return pq.read_table(path, columns=columns)
  return pq.read_table(path, columns=columns, filesystem=fs, use_threads=False)


def _short(value: Any, width: int = 70) -> str:
  text = value if isinstance(value, str) else json.dumps(value, default=str, ensure_ascii=False)
  text = " ".join(text.split())
  return text if len(text) <= width else text[:width - 1] + "…"


def task_summary(value: Any) -> str:
  """A task column value in a few words: the text, or the labels found."""
  if value is None:
    return "null"
  if "text" in value:
    return repr(_short(value["text"], 60)) + (" (truncated)" if value.get("truncated") else "")
  objects = value.get("objects") or []
  labels = collections.Counter(o["label"] for o in objects)
  found = ", ".join(f"{k}×{n}" for k, n in labels.most_common()) or "nothing"
  errs = len(value.get("parse_errors") or [])
  return f"{found}" + (f" ({errs} parse error{'s' * (errs != 1)})" if errs else "")


def exactly_once(output_uri: str, input_uri: str, input_format: str, storage_options: Optional[dict] = None,
                 input_storage_options: Optional[dict] = None) -> dict:
  """Checks the promise "every input image exactly once" of an output against its input listing:
    duplicate_keys   (shard, key) — or for image files the image URI — held by more than one committed row
    missing          listed images (image files) or input shards (tar / Parquet) no committed shard holds
    changed_shards   committed shards whose input object changed since their commit (size/generation/etag)
  Reads the key columns of every committed file (a full pass over the output's keys, not its data)."""
  import collections
  from pgbatch.io import readers, resume, sink as sink_lib
  committed = sink_lib.Sink(output_uri, None, storage_options).committed()
  images = input_format == "images"
  seen: collections.Counter = collections.Counter()
  for e in committed.values():
    t = read_file(e["file"], ["shard", "key", "source_uri"], storage_options)
    if images:
      seen.update(u for u in t.column("source_uri").to_pylist() if u)
    else:
      seen.update(zip(t.column("shard").to_pylist(), t.column("key").to_pylist()))
  dups = [{"source": k, "count": n} if images else {"shard": k[0], "key": k[1], "count": n}
          for k, n in sorted(seen.items()) if n > 1]
  shards = readers.list_shards(input_uri, input_format, storage_options=input_storage_options)
  if images:
    missing = sorted({u for s in shards for u in s.uris} - sink_lib.committed_sources(committed, storage_options))
  else:
    missing = [s.id for s in shards if s.id not in committed]
  work = resume.plan(input_format, shards, committed, 1000, storage_options=storage_options)
  return {"input": input_uri, "format": input_format, "duplicate_keys": dups, "missing": missing,
          "changed_shards": [{"shard": sid, "fields": f} for sid, f in work.changed],
          "ok": not dups and not missing and not work.changed}


def summarize(output_uri: str, rows: int = 3, storage_options: Optional[dict] = None,
              input_uri: Optional[str] = None, input_format: Optional[str] = None,
              input_storage_options: Optional[dict] = None) -> dict:
  """A JSON-able report of an output (see the module doc); with the job's input, also `exactly_once`."""
  from pgbatch import schema as schema_lib, tasks as tasks_lib
  from pgbatch.io import sink as sink_lib
  entries = sink_lib.read_manifest(output_uri, storage_options)
  s = sink_lib.Sink(output_uri, None, storage_options)
  _, stale = s._scan()  # pylint: disable=protected-access
  status = collections.Counter()
  reasons = collections.Counter()
  jobs, runs = collections.Counter(), set()
  for e in entries:
    for k in ("ok", "error", "filtered"):
      status[k] += int(e.get(k) or 0)
    for r, n in (e.get("errors") or {}).items():
      reasons[r] += int(n)
    jobs[e.get("job")] += 1
    runs.add(e.get("run_id"))
  report: dict[str, Any] = {
      "output": output_uri, "shards": len(entries), "rows": sum(int(e.get("rows") or 0) for e in entries),
      "status": dict(status), "error_reasons": dict(reasons.most_common()), "jobs": dict(jobs),
      "runs": len(runs - {None}), "uncommitted_files": [s.uri(p) for p in stale], "tasks": [],
      "error_examples": [], "safety": {}, "samples": [],
  }
  if input_uri:
    report["exactly_once"] = exactly_once(output_uri, input_uri, input_format or "webdataset", storage_options,
                                          input_storage_options)
  if not entries:
    return report
  first = read_file(entries[0]["file"], storage_options=storage_options)
  report["schema_version"] = (first.schema.metadata or {}).get(schema_lib.META_VERSION, b"?").decode()
  try:
    tasks = tasks_lib.tasks_of(first.schema)
  except (KeyError, ValueError):
    tasks = []
  report["tasks"] = [{"name": t.name, "kind": t.kind} for t in tasks]
  safety = collections.Counter(r["decision"] for r in first.column("safety").to_pylist() if r is not None) \
      if "safety" in first.column_names else collections.Counter()
  report["safety"] = {"sampled_shards": 1, "decisions": dict(safety)}
  # example error messages: from the first few files that have errors
  examples = []
  for e in [e for e in entries if e.get("error")][:5]:
    t = first if e is entries[0] else read_file(e["file"], ["key", "status", "error"], storage_options)
    for key, st, err in zip(t.column("key").to_pylist(), t.column("status").to_pylist(),
                            t.column("error").to_pylist()):
      if st == "error" and err is not None and len(examples) < 10:
        examples.append({"key": key, "shard": e["shard"], **err})
  report["error_examples"] = examples
  names = [t.name for t in tasks] or [c for c in first.column_names if c not in schema_lib.FIXED_NAMES]
  for r in first.slice(0, rows).to_pylist():
    report["samples"].append({
        "key": r["key"], "status": r["status"], "size": f"{r.get('width')}x{r.get('height')}",
        "source_uri": r.get("source_uri"),
        "safety": (r.get("safety") or {}).get("decision"),
        **{n: task_summary(r.get(n)) for n in names}})
  return report


def format_report(rep: dict) -> str:
  lines = [f"{rep['output']}: {rep['rows']} rows in {rep['shards']} committed shard file(s)"
           + (f", schema v{rep['schema_version']}" if rep.get("schema_version") else "")
           + (f", job(s) {', '.join(str(j) for j in rep['jobs'])}" if rep["jobs"] else "")]
  if not rep["shards"]:
    lines.append("  nothing committed yet (no valid entries in _manifest/)")
  if rep["tasks"]:
    lines.append("tasks:   " + ", ".join(f"{t['name']} ({t['kind']})" for t in rep["tasks"]))
  st = rep["status"]
  if rep["shards"]:
    lines.append(f"status:  ok {st.get('ok', 0)}  error {st.get('error', 0)}  filtered {st.get('filtered', 0)}")
  if rep["error_reasons"]:
    lines.append("errors (stage/type):")
    for r, n in rep["error_reasons"].items():
      lines.append(f"  {n:>8}  {r}")
  for ex in rep["error_examples"][:5]:
    lines.append(f"  e.g. {ex['key']}: [{ex.get('stage')}/{ex.get('type')}] {_short(ex.get('message') or '', 90)}")
  if rep["safety"].get("decisions"):
    lines.append("safety (first shard): " + ", ".join(f"{k} {n}" for k, n in sorted(rep["safety"]["decisions"].items())))
  if rep["samples"]:
    lines.append(f"sample rows ({len(rep['samples'])}):")
    for s in rep["samples"]:
      lines.append(f"  {s['key']}  [{s['status']}] {s['size']}  safety={s['safety']}")
      for k, v in s.items():
        if k not in ("key", "status", "size", "source_uri", "safety"):
          lines.append(f"      {k}: {v}")
  eo = rep.get("exactly_once")
  if eo:
    what = "images" if eo["format"] == "images" else "input shards"
    lines.append("exactly once: " + ("yes, every listed input is in the output once" if eo["ok"] else "NO"))
    if eo["duplicate_keys"]:
      lines.append(f"  {len(eo['duplicate_keys'])} key(s) in more than one row, e.g. {eo['duplicate_keys'][0]}")
    if eo["missing"]:
      lines.append(f"  {len(eo['missing'])} listed {what} not in the output (run the job to add them), e.g.:")
      lines += [f"    {u}" for u in eo["missing"][:5]]
    if eo["changed_shards"]:
      lines.append(f"  {len(eo['changed_shards'])} shard(s) changed in the input since their commit "
                   "(pgbatch run --redo-changed):")
      lines += [f"    {c['shard']} ({', '.join(c['fields'])})" for c in eo["changed_shards"][:5]]
  if rep["uncommitted_files"]:
    lines.append(f"WARNING: {len(rep['uncommitted_files'])} file(s) without a valid manifest entry (a run in "
                 "progress or killed; the next run removes and redoes them):")
    lines += [f"  {u}" for u in rep["uncommitted_files"][:10]]
  return "\n".join(lines)
