"""`pgbatch demo [--workdir DIR] [--fresh]`: the whole pipeline on this machine, offline, in about a minute.

Writes into DIR (default ./pgbatch-demo):
  model/demo-pg2-DEMO-WEIGHTS.npz     a tiny PaliGemma 2 DEMO model that ships inside pgbatch: taught (by
                                      tools/train_demo_model.py) only the sixteen demo photographs, its answers
                                      are memorised, not seen: it shows the machinery, it cannot annotate real data
  model/demo_tokenizer.model          SentencePiece with PaliGemma's token layout, pieces learnt from the demo texts
  model/demo-vae.npz                  the mask decoder of the segment task (hand-built, `vae-oid.npz` layout)
  shards/demo-0000N.tar               WebDataset shards of the demo photographs (scikit-image's sample data,
                                      BSD-3-Clause, shipped in pgbatch/demo_data/photos) plus one deliberately
                                      broken JPEG (key "broken")
  job.yaml                            the job spec (`pgbatch validate DIR/job.yaml`, `pgbatch run DIR/job.yaml`)
  output/                             the typed Parquet files and their _manifest; a rerun resumes it (committed
                                      shards are skipped), `--fresh` deletes it first
then runs the job on a local Ray and prints a summary and the Parquet paths.
"""
from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import sys
import tarfile
from pathlib import Path
from typing import Sequence

DEFAULT_WORKDIR = "pgbatch-demo"
DATA = Path(__file__).resolve().parent / "demo_data"
VARIANT = "tiny-pg2"
CHECKPOINT_NAME = "demo-pg2-DEMO-WEIGHTS.npz"
TOKENIZER_NAME = "demo_tokenizer.model"
VAE_NAME = "demo-vae.npz"
TEST_TOKENIZER_NAME = "test_tokenizer.model"
BROKEN_KEY = "broken"
MODEL_NOTE = (f"model: {CHECKPOINT_NAME}, a DEMO model that has memorised these {{n}} photographs and knows "
              "nothing else; point model.checkpoint/tokenizer/vae at a real PaliGemma for real annotations")


def annotations() -> dict:
  """What the demo model was taught (`pgbatch/demo_data/annotations.json`): per photograph its file, source,
  captions (en, de), OCR text and objects ({label, box [ymin, xmin, ymax, xmax] fractions})."""
  return json.loads((DATA / "annotations.json").read_text())


def samples() -> list[tuple[str, bytes, str, dict]]:
  """(key, image bytes as shipped, extension, metadata) for the demo photographs, plus one broken JPEG
  (key "broken": the first 2 KiB of a JPEG, which no decoder can finish)."""
  out = []
  for p in annotations()["photos"]:
    path = DATA / "photos" / p["file"]
    ext = path.suffix.lstrip(".").lower()
    out.append((p["key"], path.read_bytes(), ext,
                {"description": p["description"], "source": f"scikit-image sample data: {p['source']}"}))
  jpeg = next(b for _, b, e, _ in out if e == "jpg")
  out.append((BROKEN_KEY, jpeg[:2048], "jpg", {"description": "deliberately truncated JPEG", "source": "demo"}))
  return out


def _jpeg(data: bytes) -> bytes:
  from PIL import Image
  buf = io.BytesIO()
  Image.open(io.BytesIO(data)).convert("RGB").save(buf, "JPEG", quality=90)
  return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
  info = tarfile.TarInfo(name)
  info.size, info.mtime, info.mode = len(data), 0, 0o644
  tar.addfile(info, io.BytesIO(data))


def write_shards(directory, rows: Sequence[tuple], shards: int = 3, prefix: str = "demo") -> list[str]:
  """WebDataset tars `directory/{prefix}-0000N.tar` with the rows split in order (row i in
  shard i * shards // len(rows)). A row is (key, bytes, ext[, metadata dict]): members `key.ext` and, when
  metadata is given, `key.json`. Returns the tar paths."""
  directory = Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  shards = max(1, min(int(shards), len(rows)))
  paths = []
  for s in range(shards):
    part = [r for i, r in enumerate(rows) if i * shards // len(rows) == s]
    path = directory / f"{prefix}-{s:05d}.tar"
    tmp = path.with_suffix(".tar.tmp")
    with tarfile.open(tmp, "w") as tar:
      for row in part:
        key, data, ext = row[0], row[1], row[2]
        _add(tar, f"{key}.{ext}", data)
        if len(row) > 3 and row[3] is not None:
          _add(tar, f"{key}.json", json.dumps(row[3]).encode())
    os.replace(tmp, path)
    paths.append(str(path))
  return paths


def job_dict(root: Path) -> dict:
  """The demo job: every task kind the demo model was taught, named as in the README's queries."""
  ann, model = annotations(), root / "model"
  return {
      "name": "demo",
      "input": {"uri": str(root / "shards" / "*.tar"), "format": "webdataset"},
      "output": {"uri": str(root / "output") + "/"},
      "model": {"checkpoint": str(model / CHECKPOINT_NAME), "tokenizer": str(model / TOKENIZER_NAME),
                "vae": str(model / VAE_NAME), "variant": VARIANT, "dtype": "float32"},
      "tasks": [
          {"name": "caption_en", "kind": "caption", "lang": "en", "max_new_tokens": 32},
          {"name": "caption_de", "kind": "caption", "lang": "de", "max_new_tokens": 32},
          {"name": "ocr", "kind": "ocr", "max_new_tokens": 40},
          {"name": "detections", "kind": "detect", "classes": ann["detect_classes"], "max_new_tokens": 24},
          {"name": "segments", "kind": "segment", "classes": ann["segment_classes"], "max_new_tokens": 32},
      ],
      "resources": {"accelerator": "cpu", "actors": 1, "batch_size": 8},
  }


def write_demo_model(directory, log=None) -> tuple[Path, Path, Path]:
  """The shipped DEMO checkpoint, tokenizer and VQ-VAE, copied into `directory` (each written to a temporary
  name, then renamed, so an interrupted copy is never reused). Returns their paths."""
  d = Path(directory)
  d.mkdir(parents=True, exist_ok=True)
  out = []
  for name, read in ((CHECKPOINT_NAME, lambda: (DATA / CHECKPOINT_NAME).read_bytes()),
                     (TOKENIZER_NAME, lambda: gzip.decompress((DATA / "tokenizer.model.gz").read_bytes())),
                     (VAE_NAME, lambda: (DATA / "vae.npz").read_bytes())):
    path, data = d / name, read()
    if not path.exists() or path.stat().st_size != len(data) or path.read_bytes() != data:
      tmp = path.with_name(path.name + ".tmp")
      tmp.write_bytes(data)
      os.replace(tmp, path)
      if log:
        log(f"wrote {path}")
    out.append(path)
  return tuple(out)


def write_model(directory, variant: str = VARIANT, log=None) -> tuple[Path, Path]:
  """A random-weight `variant` checkpoint (`<variant>-RANDOM-WEIGHTS.npz`) and the test tokenizer in `directory`
  (benchmarks and tests), each written once (to a temporary name, then renamed)."""
  from pgbatch import checkpoints, tokenizer
  from pgbatch.model import random_params
  d = Path(directory)
  d.mkdir(parents=True, exist_ok=True)
  ckpt, tok = d / f"{variant}-RANDOM-WEIGHTS.npz", d / TEST_TOKENIZER_NAME
  if not ckpt.exists():
    if log:
      log(f"writing a tiny {variant} checkpoint with RANDOM weights → {ckpt}")
    tmp = ckpt.with_name(ckpt.name + ".tmp")
    checkpoints.write_npz(random_params(variant, seed=0), str(tmp))
    os.replace(tmp, ckpt)
  if not tok.exists():
    if log:
      log(f"building the test tokenizer → {tok}")
    tmp = tok.with_name(tok.name + ".tmp")
    tokenizer.build_test_tokenizer(str(tmp))
    os.replace(tmp, tok)
  return ckpt, tok


def prepare(workdir, shards: int = 3, log=print) -> Path:
  """Writes the demo model, shards and job.yaml into `workdir` (same bytes every time); returns the job path."""
  import yaml
  root = Path(workdir).resolve()
  write_demo_model(root / "model", log)
  rows = samples()
  shutil.rmtree(root / "shards", ignore_errors=True)
  write_shards(root / "shards", rows, shards=shards)
  log(f"wrote {len(rows)} images ({len(rows) - 1} demo photographs + 1 broken JPEG) "
      f"in {shards} WebDataset shards → {root / 'shards'}")
  job = root / "job.yaml"
  header = ("# pgbatch demo job (written by `pgbatch demo`). The checkpoint is a DEMO model that memorised the demo\n"
            "# photographs; point model.checkpoint/tokenizer/vae at a real PaliGemma to annotate real data.\n")
  job.write_text(header + yaml.safe_dump(job_dict(root), sort_keys=False))
  return job


def _start(root: Path, fresh: bool, say) -> None:
  """Says plainly whether this run resumes an earlier demo output or starts over."""
  from pgbatch.io import sink as sink_lib
  out = root / "output"
  if fresh and out.exists():
    shutil.rmtree(out)
    say(f"--fresh: deleted the previous demo output {out}; starting over")
  elif out.exists():
    done = len(sink_lib.read_manifest(str(out) + "/"))
    say(f"resuming the earlier demo output {out}: {done} shard(s) already committed are kept and skipped "
        "(`pgbatch demo --fresh` starts over)")


def run_demo(workdir=DEFAULT_WORKDIR, progress: bool = True, out=None, fresh: bool = False) -> int:
  """prepare → validate → run on local Ray → summary. Returns the process exit code."""
  out = out or sys.stdout

  def say(msg: str) -> None:
    print(msg, file=out, flush=True)

  from pgbatch import config, pipeline
  root = Path(workdir).resolve()
  job = prepare(root, log=say)
  spec = config.load(str(job), environ={})
  _start(root, fresh, say)
  say(f"job spec → {job}")
  say("running on a local Ray (first run compiles the model: ~30 s) …")
  summary = pipeline.run(spec, progress=progress)
  say("")
  say(summary.line())
  if summary.phases:
    say("  " + summary.phases_line())
  say("  " + MODEL_NOTE.format(n=len(samples()) - 1))
  if summary.reasons:
    say("  " + summary.reasons_line())
  for f in summary.files:
    say(f"  parquet: {f}")
  say(f"  manifest: {root / 'output' / '_manifest'}")
  from pgbatch import inspection
  say("")
  say(inspection.format_report(inspection.summarize(str(root / "output"), rows=2)))
  say("")
  from pgbatch import report
  html = report.write_html(str(root / "output") + "/", str(root / "report.html"))
  say(f"report:     {html}  (open it in a browser: thumbnails with boxes, masks, captions, OCR)")
  say(f"inspect it: pgbatch inspect {root / 'output'} [--html report.html]")
  say(f"query it:   pip install duckdb && python -c \"import duckdb; duckdb.sql(\\\"SELECT key, status, caption_en.text, "
      f"len(detections.objects) AS boxes FROM '{root / 'output'}/*.parquet' ORDER BY key\\\").show()\"")
  if not summary.success:
    say(f"demo FAILED: {summary.failure}")
    return 1
  return 0
