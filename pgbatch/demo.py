"""`pgbatch demo [--workdir DIR]`: the whole pipeline on this machine, offline, in about a minute.

Writes into DIR (default ./pgbatch-demo):
  model/tiny-pg2-RANDOM-WEIGHTS.npz   a tiny PaliGemma 2 with RANDOM weights (its outputs are meaningless:
                                      the demo shows the machinery, not the model)
  model/test_tokenizer.model          a small real SentencePiece model with PaliGemma's token layout
  shards/demo-0000N.tar               WebDataset shards of the sample photographs that ship inside the
                                      scikit-image wheel (astronaut, cat, coffee, rocket, a printed page …)
                                      plus one deliberately broken JPEG (key "broken")
  job.yaml                            the job spec (`pgbatch validate DIR/job.yaml`, `pgbatch run DIR/job.yaml`)
  output/                             the typed Parquet files and their _manifest (recreated on every run)
then runs the job on a local Ray and prints a summary and the Parquet paths.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import sys
import tarfile
from pathlib import Path
from typing import Sequence

DEFAULT_WORKDIR = "pgbatch-demo"
VARIANT = "tiny-pg2"
CHECKPOINT_NAME = f"{VARIANT}-RANDOM-WEIGHTS.npz"
TOKENIZER_NAME = "test_tokenizer.model"
BROKEN_KEY = "broken"

# (file in skimage/data, key, description): real photographs and scans shipped with scikit-image.
PHOTOS = (
    ("astronaut.png", "astronaut", "Eileen Collins, NASA astronaut portrait"),
    ("chelsea.png", "chelsea", "Chelsea the cat"),
    ("coffee.png", "coffee", "a cup of coffee on a saucer"),
    ("rocket.jpg", "rocket", "a rocket on its launch pad"),
    ("motorcycle_left.png", "motorcycle", "a motorcycle (left view of a stereo pair)"),
    ("camera.png", "camera", "a man with a camera, grayscale"),
    ("page.png", "page", "a scanned page of text"),
    ("text.png", "text", "text on a street sign, grayscale"),
    ("coins.png", "coins", "Greek coins"),
    ("hubble_deep_field.jpg", "hubble", "Hubble eXtreme Deep Field"),
    ("retina.jpg", "retina", "a human retina"),
    ("ihc.png", "ihc", "immunohistochemistry stain"),
    ("moon.png", "moon", "surface of the moon"),
    ("clock_motion.png", "clock", "a clock with motion blur"),
    ("logo.png", "logo", "the scikit-image logo (RGBA)"),
    ("color.png", "color", "a colour chart"),
    ("brick.png", "brick", "brick wall texture"),
    ("grass.png", "grass", "grass texture"),
    ("gravel.png", "gravel", "gravel texture"),
    ("cell.png", "cell", "a cell under a microscope"),
    ("no_time_for_that_tiny.gif", "animated", "an animated GIF"),
)


def skimage_data_dir() -> Path:
  import importlib.util
  spec = importlib.util.find_spec("skimage.data")
  if spec is None or not spec.submodule_search_locations:
    raise RuntimeError("scikit-image is not installed (pip install scikit-image)")
  return Path(list(spec.submodule_search_locations)[0])


def samples() -> list[tuple[str, bytes, str, dict]]:
  """(key, image bytes as shipped, extension, metadata) for the sample photographs, plus one broken JPEG
  (key "broken": the first 2 KiB of a JPEG, which no decoder can finish)."""
  d = skimage_data_dir()
  out = []
  for name, key, desc in PHOTOS:
    path = d / name
    if path.exists():
      ext = path.suffix.lstrip(".").lower()
      out.append((key, path.read_bytes(), ext, {"description": desc, "source": f"scikit-image: skimage/data/{name}"}))
  if not out:
    raise RuntimeError(f"no sample images found in {d}")
  jpeg = next((b for _, b, e, _ in out if e == "jpg"), None) or _jpeg(out[0][1])
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
  return {
      "name": "demo",
      "input": {"uri": str(root / "shards" / "*.tar"), "format": "webdataset"},
      "output": {"uri": str(root / "output") + "/"},
      "model": {"checkpoint": str(root / "model" / CHECKPOINT_NAME), "tokenizer": str(root / "model" / TOKENIZER_NAME),
                "variant": VARIANT, "dtype": "float32"},
      "tasks": [
          {"name": "caption_en", "kind": "caption", "lang": "en", "max_new_tokens": 24},
          {"name": "ocr", "kind": "ocr", "max_new_tokens": 24},
          {"name": "objects", "kind": "detect", "classes": ["person", "cat", "cup"], "max_new_tokens": 24},
      ],
      "resources": {"accelerator": "cpu", "actors": 1, "batch_size": 8},
  }


def write_model(directory, variant: str = VARIANT, log=None) -> tuple[Path, Path]:
  """A random-weight `variant` checkpoint (`<variant>-RANDOM-WEIGHTS.npz`) and the test tokenizer in `directory`,
  each written once (to a temporary name, then renamed, so an interrupted write is never reused)."""
  from pgbatch import checkpoints, tokenizer
  from pgbatch.model import random_params
  d = Path(directory)
  d.mkdir(parents=True, exist_ok=True)
  ckpt, tok = d / f"{variant}-RANDOM-WEIGHTS.npz", d / TOKENIZER_NAME
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
  """Writes checkpoint (once), tokenizer (once), shards and job.yaml into `workdir`; returns the job path."""
  import yaml
  root = Path(workdir).resolve()
  write_model(root / "model", VARIANT, log)
  rows = samples()
  shutil.rmtree(root / "shards", ignore_errors=True)
  write_shards(root / "shards", rows, shards=shards)
  log(f"wrote {len(rows)} images ({len(rows) - 1} sample photographs from scikit-image + 1 broken JPEG) "
      f"in {shards} WebDataset shards → {root / 'shards'}")
  job = root / "job.yaml"
  header = ("# pgbatch demo job (written by `pgbatch demo`). The checkpoint has RANDOM weights: outputs are\n"
            "# meaningless; point model.checkpoint/tokenizer at a real PaliGemma to get real annotations.\n")
  job.write_text(header + yaml.safe_dump(job_dict(root), sort_keys=False))
  return job


def run_demo(workdir=DEFAULT_WORKDIR, progress: bool = True, out=None) -> int:
  """prepare → validate → run on local Ray → summary. Returns the process exit code."""
  out = out or sys.stdout

  def say(msg: str) -> None:
    print(msg, file=out, flush=True)

  from pgbatch import config, pipeline
  root = Path(workdir).resolve()
  job = prepare(root, log=say)
  spec = config.load(str(job), environ={})
  shutil.rmtree(root / "output", ignore_errors=True)
  say(f"job spec → {job}")
  say("running on a local Ray (first run compiles the model: ~30 s) …")
  summary = pipeline.run(spec, progress=progress)
  say("")
  say(summary.line() + f"  [model: {CHECKPOINT_NAME}: RANDOM WEIGHTS, outputs are meaningless]")
  if summary.reasons:
    say("  " + summary.reasons_line())
  for f in summary.files:
    say(f"  parquet: {f}")
  say(f"  manifest: {root / 'output' / '_manifest'}")
  if summary.files:
    from pgbatch import inspection
    say("")
    say(inspection.format_report(inspection.summarize(str(root / "output"), rows=2)))
    say("")
  say(f"inspect it: pgbatch inspect {root / 'output'}")
  say(f"query it:   pip install duckdb && python -c \"import duckdb; duckdb.sql(\\\"SELECT key, status, caption_en.text "
      f"FROM '{root / 'output'}/*.parquet'\\\").show()\"")
  if not summary.success:
    say(f"demo FAILED: {summary.failure}")
    return 1
  return 0
