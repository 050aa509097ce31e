"""bench/safety_bench.py runs tiny and reports every figure it promises (no timing assertions)."""
import importlib.util
import json
import math
import pathlib

BENCH = pathlib.Path(__file__).resolve().parents[1] / "bench" / "safety_bench.py"


def load_bench():
  spec = importlib.util.spec_from_file_location("safety_bench", BENCH)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_safety_bench_smoke(capsys):
  bench = load_bench()
  argv = ["--seconds", "0", "--images", "2", "--texts", "6", "--image-size", "256", "--hashes", "50",
          "--texts-per-image", "3", "--target", "500", "--json"]
  assert bench.main(argv) == 0
  rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  *filters, size = rows
  names = [r["filter"] for r in filters]
  assert names == ["hashlist sha256", "hashlist phash", "phash only", "nsfw (decode+model)", "toxicity",
                   "wordlist en", "wordlist all 15 languages", "pii", "PreFilter defaults (images)",
                   "PreFilter + hashlist sha256", "PostFilter defaults (3 texts/image)"]
  for r in filters:
    assert r["items"] >= 1 and r["items_per_s"] > 0 and r["items_per_cpu_s"] > 0, r
  stages = {r["filter"]: r for r in filters if r["kind"] == "stage"}
  assert stages["PreFilter defaults (images)"]["images_per_item"] == 2
  assert stages["PostFilter defaults (3 texts/image)"]["images_per_item"] == 2
  assert size["kind"] == "sizing" and size["texts_per_image"] == 3
  assert size["pre_workers"] == math.ceil(500 / stages["PreFilter defaults (images)"]["images_per_cpu_s"])
  assert size["workers"] == size["pre_workers"] + size["post_workers"] >= 2


def test_bench_inputs_are_real_and_varied():
  bench = load_bench()
  imgs = bench.photos(200, 10)
  assert len(set(imgs)) == 10 and all(b[:2] == b"\xff\xd8" for b in imgs)
  texts = bench.texts(40)
  assert len(texts) == 40 and sum("\n" in t or t.isupper() for t in texts[1::2]) >= 1
  assert any(p in t for t in texts for p in bench.PII)
