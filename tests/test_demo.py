"""`pgbatch demo`, the README's first command: run as a user would (no arguments, fresh folder, subprocess)."""
import io
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from pgbatch import cli, config, demo
from pgbatch.io import readers
from tests import pipeline_helpers as H


def test_samples_are_shipped_photographs_plus_one_broken():
  """The photographs ship inside pgbatch (no scikit-image at run time), with their licence and credits."""
  s = demo.samples()
  keys = [k for k, *_ in s]
  assert len(keys) == len(set(keys)) >= 15 and keys[-1] == demo.BROKEN_KEY
  sizes, modes = {}, set()
  for key, data, ext, meta in s[:-1]:
    im = Image.open(io.BytesIO(data))
    im.load()
    sizes[key], _ = im.size, modes.add(im.mode)
    assert meta["source"].startswith("scikit-image") and ext in readers.IMAGE_EXTENSIONS
  assert sizes["astronaut"] == (512, 512) and sizes["chelsea"] == (451, 300)
  assert {"RGB", "L", "RGBA", "P"} <= modes  # colour, grayscale, alpha, palette (the animated GIF)
  with pytest.raises(OSError):
    im = Image.open(io.BytesIO(s[-1][1]))
    im.load()
  license_text = (demo.DATA / "LICENSE-photos.txt").read_text()
  assert "BSD" in license_text and all(p["file"] in license_text for p in demo.annotations()["photos"])
  assert sum(f.stat().st_size for f in demo.DATA.rglob("*") if f.is_file()) < 4_000_000


def test_write_shards_round_trips_through_the_reader(tmp_path):
  rows = demo.samples()[:5]
  paths = demo.write_shards(tmp_path, rows, shards=2, prefix="x")
  assert [os.path.basename(p) for p in paths] == ["x-00000.tar", "x-00001.tar"]
  got = []
  for shard in readers.list_shards(str(tmp_path / "*.tar"), "webdataset"):
    got += readers.read_shard(shard, "webdataset")
  assert [r["key"] for r in got] == [r[0] for r in rows]
  assert [r["image_bytes"] for r in got] == [r[1] for r in rows]
  assert all(r["status"] == "ok" and "scikit-image" in r["metadata"] for r in got)


def test_demo_defaults():
  args = cli.build_parser().parse_args(["demo"])
  assert args.workdir == "pgbatch-demo" and not args.no_progress and not args.fresh


def test_demo_model_answers_as_taught_through_the_engine(tmp_path):
  """The shipped DEMO model, loaded like any checkpoint, gives the taught caption of a photograph."""
  from pgbatch import model as model_lib, tokenizer
  from pgbatch.io.decode import decode_image
  ckpt, tok_path, vae = demo.write_demo_model(tmp_path)
  tok = tokenizer.load(str(tok_path))
  m = model_lib.load(str(ckpt), dtype="float32", variant=demo.VARIANT)
  photo = next(p for p in demo.annotations()["photos"] if p["key"] == "chelsea")
  pixels, _, _ = decode_image((demo.DATA / "photos" / photo["file"]).read_bytes(), m.config.image_size)
  out = m.generate(pixels[None].astype("float32") * (2 / 255) - 1, [tok.encode_prompt("caption en")], 32)
  assert tok.decode(out[0]) == photo["caption_en"]


def test_pgbatch_demo_end_to_end(tmp_path):
  env = {k: v for k, v in os.environ.items()
         if k not in ("JAX_PLATFORMS", "XLA_FLAGS", "RAY_ADDRESS", "RAY_AUTH_MODE")}
  env.update(PYTHONPATH=str(H.ROOT))
  start = time.monotonic()
  # the README's command: the `pgbatch` console script of `pip install -e .` (python -m where not installed)
  cmd = [shutil.which("pgbatch")] if shutil.which("pgbatch") else [sys.executable, "-m", "pgbatch.cli"]
  p = subprocess.run(cmd + ["demo"], cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=600)
  seconds = time.monotonic() - start
  assert p.returncode == 0, p.stdout + p.stderr
  root = tmp_path / "pgbatch-demo"
  out = p.stdout
  print(f"pgbatch demo took {seconds:.1f} s\n{out}")
  n = len(demo.samples())
  assert f"pgbatch: demo: {n} images (ok {n - 1}, error 1, filtered 0) in 3/3 shards" in out
  assert "DEMO model" in out and "resuming" not in out
  assert (root / "model" / demo.CHECKPOINT_NAME).is_file() and (root / "job.yaml").is_file()
  spec = config.load(str(root / "job.yaml"), environ={})
  entries, tables = H.read_output(spec.output.uri)
  for e in entries:
    assert f"parquet: {e['file']}" in out
  rows = {r["key"]: r for t in tables.values() for r in t.to_pylist()}
  assert sorted(rows) == sorted(k for k, *_ in demo.samples())
  assert rows[demo.BROKEN_KEY]["status"] == "error" and rows[demo.BROKEN_KEY]["error"]["stage"] == "decode"
  check_taught_answers(rows)
  check_progress_and_stderr(p.stderr, out, n)
  assert cli.main(["inspect", spec.output.uri, "--html", str(tmp_path / "again.html")]) == 0
  assert (tmp_path / "again.html").read_text() == (root / "report.html").read_text()
  check_readme_output_layout(spec.output.uri.rstrip("/"), n)
  check_readme_queries(spec.output.uri.rstrip("/"))
  check_report(root / "report.html", rows, out)
  again = subprocess.run(cmd + ["demo", "--no-progress"], cwd=str(tmp_path), env=env, capture_output=True,
                         text=True, timeout=600)
  assert again.returncode == 0, again.stdout + again.stderr
  assert "resuming the earlier demo output" in again.stdout and "3 shard(s) already committed" in again.stdout
  assert [e["committed_at"] for e in H.read_output(spec.output.uri)[0]] == [e["committed_at"] for e in entries]


def check_progress_and_stderr(err: str, out: str, n: int):
  """A non-terminal stream (a log): progress lines while it runs, then a final line that reports every shard
  and the same annotating rate as the summary; no authentication WARNING from Ray (a local Ray asks for token
  auth explicitly). Ray Data's own core_worker line about actor constructor arguments (ray#53727) remains:
  Ray Data itself puts the map transformer into the object store."""
  import re
  lines = [line for line in err.splitlines() if line.startswith("[") and " shards  " in line]
  assert len(lines) >= 2 and "0/3 shards" in lines[0]
  final = lines[-1]
  assert final.startswith("[" + "#" * 24 + "] 3/3 shards  " + f"{n} images  ") and "ETA 0:00" in final
  shown = re.search(r"  (\S+) img/s annotating", final).group(1)
  summary = re.search(r"([\d.]+) images/s annotating", out)
  assert shown == (summary.group(1) if summary else "…"), (final, out)
  assert re.search(r"phases: checking input and model \d+:\d\d, starting Ray \d+:\d\d, loading and compiling "
                   r"the model \d+:\d\d, annotating \d+:\d\d", out)
  assert "WARNING" not in err and "Token authentication" not in err, err


def check_taught_answers(rows: dict):
  """Captions for most photographs; the taught box and a mask at the right place for the cat."""
  photos = demo.annotations()["photos"]
  captions = [rows[p["key"]]["caption_en"]["text"] for p in photos]
  assert sum(bool(c) for c in captions) >= 0.8 * len(photos), captions
  assert sum(rows[p["key"]]["caption_en"]["text"] == p["caption_en"] for p in photos) >= 0.8 * len(photos)
  assert sum(rows[p["key"]]["caption_de"]["text"] == p["caption_de"] for p in photos) >= 0.8 * len(photos)
  page = next(p for p in photos if p["key"] == "page")
  assert rows["page"]["ocr"]["text"] == page["ocr"]
  cat = rows["chelsea"]
  (box,) = cat["detections"]["objects"]
  (seg,) = cat["segments"]["objects"]
  taught = next(p for p in photos if p["key"] == "chelsea")["objects"][0]["box"]
  for obj in (box, seg):
    assert obj["label"] == "cat"
    assert all(abs(obj[k] - t) < 0.01 for k, t in zip(("ymin", "xmin", "ymax", "xmax"), taught)), obj
  from pgbatch.masks import rle_decode
  m = seg["mask"]
  assert (m["height"], m["width"]) == (cat["height"], cat["width"]) == (300, 451)
  mask = rle_decode(m["rle"], m["height"], m["width"])
  inside = mask[seg["ymin_px"]:seg["ymax_px"], seg["xmin_px"]:seg["xmax_px"]]
  assert mask.sum() == inside.sum() and 0.5 < inside.mean() < 0.95  # the ellipse in its box, nothing outside
  assert mask[150, 225] and not mask[5, 30]  # centre in, corner out


def check_report(path, rows: dict, stdout: str):
  """The demo's HTML report: self-contained, one card per row, the cat's box on the thumbnail where it belongs."""
  from tests import test_report as R
  from pgbatch import report
  assert f"report:     {path}" in stdout
  text = path.read_text()
  R.assert_self_contained(text)
  thumbs = dict(R.images_in(text))
  assert set(thumbs) == set(rows) - {demo.BROKEN_KEY}
  assert text.count('class="card"') == len(rows) and 'data-status="error"' in text and "decode/" in text
  assert "onclick=\"show('error')\"" in text and ">demo-00000-" in text  # filters, per-shard counts
  labels = sorted({o["label"] for r in rows.values() for c in ("detections", "segments") if r[c]
                   for o in r[c]["objects"]})
  cat, img = rows["chelsea"]["detections"]["objects"][0], np.asarray(thumbs["chelsea"])
  scale = 320 / 451
  x0, ymid = round(cat["xmin_px"] * scale), round((cat["ymin_px"] + cat["ymax_px"]) / 2 * scale)
  assert img.shape == (round(300 * scale), 320, 3)
  assert tuple(img[ymid, x0]) == report.label_colour("cat", labels), img[ymid, x0 - 2:x0 + 3]


def check_readme_queries(out: str):
  """Every DuckDB / Polars / pycocotools snippet of the README's "Output contract" section runs verbatim on the
  demo output (with `out/` pointing there) and returns rows."""
  import re
  import duckdb
  readme = (H.ROOT / "README.md").read_text()
  section = readme.split("\n## Output contract\n", 1)[1].split("\n## ", 1)[0].split("\n### ", 1)[0]
  blocks = re.findall(r"```(sql|python)\n(.*?)```", section, re.S)
  assert [lang for lang, _ in blocks] == ["sql", "python", "python"]
  boxes = duckdb.sql(blocks[0][1].replace("out/", out + "/")).fetchall()
  assert len(boxes) >= 4 and {b[1] for b in boxes} >= {"person", "cat", "cup", "motorcycle"}
  scope: dict = {}
  exec(blocks[1][1].replace('"out/', '"' + out + "/"), scope)  # noqa: S102
  assert scope["boxes"].height == len(boxes) and "xmin_px" in scope["boxes"].columns
  scope = {}
  exec(blocks[2][1].replace('"out/', '"' + out + "/"), scope)  # noqa: S102
  assert scope["binary"].ndim == 2 and scope["binary"].sum() > 0


def check_readme_output_layout(out: str, n: int):
  """The README's "Output layout" snippets run on the demo's output and give what they say."""
  import re
  import duckdb
  readme = (H.ROOT / "README.md").read_text()
  section = readme.split("\n## Output layout\n", 1)[1].split("\n## ", 1)[0].split("\n### ", 1)[0]
  blocks = re.findall(r"```(sql|python)\n(.*?)```", section, re.S)
  assert [lang for lang, _ in blocks] == ["sql", "python"]
  statements = [s for s in blocks[0][1].split("\n\n") if s.strip()]
  by_status = duckdb.sql(statements[0].replace("out/", out + "/")).fetchall()
  assert by_status == [("ok", None, None, n - 1), ("error", "decode", "TruncatedImageError", 1)]
  shards = duckdb.sql(statements[1].replace("out/", out + "/")).fetchall()
  assert len(shards) == 3 and sum(r[1] for r in shards) == n and sum(r[3] for r in shards) == 1
  scope = {}
  exec(blocks[1][1].replace('"out/"', repr(out + "/")), scope)  # noqa: S102
  assert scope["captions"].height == n - 1 and scope["captions"].columns == ["key", "shard", "caption"]
