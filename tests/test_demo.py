"""`pgbatch demo`, the README's first command: run as a user would (no arguments, fresh folder, subprocess)."""
import io
import os
import shutil
import subprocess
import sys
import time

import pytest
from PIL import Image

from pgbatch import cli, config, demo
from pgbatch.io import readers
from tests import pipeline_helpers as H


def test_samples_are_real_photographs_plus_one_broken():
  s = demo.samples()
  keys = [k for k, *_ in s]
  assert len(keys) == len(set(keys)) >= 15 and keys[-1] == demo.BROKEN_KEY
  sizes = {}
  for key, data, ext, meta in s[:-1]:
    im = Image.open(io.BytesIO(data))
    im.load()
    sizes[key] = im.size
    assert meta["source"].startswith("scikit-image") and ext in readers.IMAGE_EXTENSIONS
  assert sizes["astronaut"] == (512, 512) and sizes["chelsea"] == (451, 300)
  with pytest.raises(OSError):
    im = Image.open(io.BytesIO(s[-1][1]))
    im.load()


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
  assert args.workdir == "pgbatch-demo" and not args.no_progress


def test_pgbatch_demo_end_to_end(tmp_path):
  env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS", "RAY_ADDRESS")}
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
  assert "RANDOM WEIGHTS" in out and "RANDOM-WEIGHTS" in out
  assert (root / "model" / demo.CHECKPOINT_NAME).is_file() and (root / "job.yaml").is_file()
  spec = config.load(str(root / "job.yaml"), environ={})
  entries, tables = H.read_output(spec.output.uri)
  for e in entries:
    assert f"parquet: {e['file']}" in out
  keys = sorted(k for t in tables.values() for k in t.column("key").to_pylist())
  assert keys == sorted(k for k, *_ in demo.samples())
  broken = [r for t in tables.values() for r in t.to_pylist() if r["key"] == demo.BROKEN_KEY]
  assert broken[0]["status"] == "error" and broken[0]["error"]["stage"] == "decode"
  assert cli.main(["inspect", spec.output.uri]) == 0
  check_readme_output_layout(spec.output.uri.rstrip("/"), n)


def check_readme_output_layout(out: str, n: int):
  """The README's "Output layout" snippets run on the demo's output and give what they say."""
  import re
  import duckdb
  readme = (H.ROOT / "README.md").read_text()
  section = readme.split("\n## Output layout\n", 1)[1].split("\n## ", 1)[0]
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
