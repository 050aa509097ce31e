"""`pgbatch run JOB.yaml --limit N` / `--sample FRACTION --seed S`: annotate a few images, see the results at once.

The loop for iterating on prompts, classes and thresholds: the chosen images are copied (read on this machine,
through the job's own reader) into one WebDataset shard under the preview folder, the job runs on that shard
with the output in the preview folder, and the results are printed per image and task and written as the HTML
report. The job's `output.uri` (its Parquet files and manifest) is never touched.

  --limit N           the first N images, in shard order
  --sample F --seed S each image with probability F, decided by a hash of (seed, shard, key): the same images for
                      the same seed; every shard is read on this machine to choose them, so keep to inputs that
                      can be listed and read from here (or combine with --limit to stop early)

Preview folder: `--preview-dir` (default `./pgbatch-preview/<job name>/`), emptied at the start of each preview:
  input/preview-00000.tar   the chosen images and their metadata, under their keys ('.' in a key becomes '_')
  output/                   Parquet + _manifest of the preview run
  report.html               the contact sheet (`pgbatch inspect` --html)
"""
from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path
from typing import Iterator, Optional

DEFAULT_DIR = "pgbatch-preview"


def chosen(key: str, shard: str, fraction: float, seed: int) -> bool:
  """Deterministic Bernoulli(fraction) per image: sha256(seed, shard, key) read as a number in [0, 1)."""
  digest = hashlib.sha256(f"{seed}\0{shard}\0{key}".encode()).digest()
  return int.from_bytes(digest[:8], "big") / 2 ** 64 < fraction


def _ext(data: bytes) -> str:
  """A member extension the WebDataset reader takes as an image (the decoder sniffs the bytes anyway)."""
  for magic, ext in ((b"\x89PNG", "png"), (b"GIF8", "gif"), (b"RIFF", "webp"), (b"II*\x00", "tif"),
                     (b"MM\x00*", "tif"), (b"BM", "bmp")):
    if data.startswith(magic):
      return ext
  return "jpg"


def select(spec, limit: Optional[int], fraction: Optional[float], seed: int) -> Iterator[dict]:
  """Reader rows (with image bytes) of the preview's images, in shard order."""
  from pgbatch.io import readers
  shards = readers.list_shards(spec.input.uri, spec.input.format, files_per_shard=spec.input.files_per_shard,
                               storage_options=dict(spec.input.storage_options) or None)
  taken = 0
  for shard in shards:
    rows = readers.read_shard(shard, spec.input.format, image_column=spec.input.image_column,
                              key_column=spec.input.key_column,
                              storage_options=dict(spec.input.storage_options) or None)
    for row in rows:
      if not row.get("image_bytes") or (fraction is not None and not chosen(row["key"], shard.id, fraction, seed)):
        continue
      yield row
      taken += 1
      if limit is not None and taken >= limit:
        return


def write_shard(path: Path, rows: list[tuple[str, bytes, str, dict]]) -> None:
  """One WebDataset tar: members `key.ext` (the image) and `key.json` (its metadata)."""
  import io
  import tarfile
  path.parent.mkdir(parents=True, exist_ok=True)
  with tarfile.open(path, "w") as tar:
    for key, data, ext, meta in rows:
      for name, blob in ((f"{key}.{ext}", data), (f"{key}.json", json.dumps(meta).encode())):
        info = tarfile.TarInfo(name)
        info.size, info.mode = len(blob), 0o644
        tar.addfile(info, io.BytesIO(blob))


def prepare(spec, directory: Path, limit: Optional[int], fraction: Optional[float], seed: int):
  """Writes the chosen images as one shard and returns (preview spec, number of images)."""
  from pgbatch import config
  if directory.exists():
    shutil.rmtree(directory)
  rows = [(r["key"].replace(".", "_"), r["image_bytes"], _ext(r["image_bytes"]),
           json.loads(r.get("metadata") or "{}")) for r in select(spec, limit, fraction, seed)]
  if not rows:
    return None, 0
  write_shard(directory / "input" / "preview-00000.tar", rows)
  tree = spec.model_dump(mode="json", exclude_none=True)
  tree["input"] = {"uri": str(directory / "input" / "*.tar"), "format": "webdataset"}
  tree["output"] = {"uri": str(directory / "output") + "/"}
  return config.from_dict(tree, environ={}, source="preview"), len(rows)


def print_rows(output_uri: str, out=None) -> None:
  """One block per image: key, status (error reason), then each task's result in a few words."""
  out = out or sys.stdout
  from pgbatch import inspection, tasks as tasks_lib
  from pgbatch.io import sink as sink_lib
  for entry in sink_lib.read_manifest(output_uri):
    table = inspection.read_file(entry["file"])
    names = [t.name for t in tasks_lib.tasks_of(table.schema)]
    for row in table.to_pylist():
      err = row.get("error")
      why = f" {err['stage']}/{err['type']}: {err['message']}" if err else ""
      print(f"{row['key']}  [{row['status']}]{why}", file=out)
      for name in names:
        if row.get(name) is not None:
          print(f"    {name}: {inspection.task_summary(row[name])}", file=out)


def run_preview(spec, args, run) -> int:
  """`pgbatch run --limit/--sample`: see the module doc; `run` is `pipeline.run`. Returns the exit code."""
  from pgbatch import report
  directory = Path(args.preview_dir or Path(DEFAULT_DIR) / spec.name).resolve()
  what = (f"the first {args.limit} image(s)" if args.sample is None else
          f"a {args.sample:g} sample (seed {args.seed})" + (f", at most {args.limit}" if args.limit else ""))
  print(f"preview of {spec.name}: {what} → {directory} (the job's output {spec.output.uri} is not touched)")
  preview, n = prepare(spec, directory, args.limit, args.sample, args.seed)
  if preview is None:
    print(f"pgbatch run: {spec.name}: the preview selected no images from {spec.input.uri}", file=sys.stderr)
    return 2
  summary = run(preview, progress=not args.no_progress)
  print_rows(preview.output.uri)
  print(summary.line())
  if summary.files:
    print(f"report: {report.write_html(preview.output.uri, str(directory / 'report.html'))}")
  return 0 if summary.success else 1
