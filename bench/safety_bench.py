"""Safety filter throughput on this machine's CPU: items/s per CPU worker, per filter and per pipeline stage.

    python bench/safety_bench.py [--seconds 3] [--image-size 1024] [--texts-per-image 2] [--target 500] [--json]

Every filter runs single-threaded (onnxruntime intra-op threads = 1, OMP_NUM_THREADS=1), so a rate is what one
CPU worker (a Ray task/actor with num_cpus=1) sustains. Inputs are real photographs (scikit-image samples,
re-encoded as JPEG at --image-size on the long side) and generated captions / OCR-like texts, a fifth of the
OCR texts carrying test PII values. Rates are reported against wall time and against this process's CPU time;
on a shared machine the CPU-time rate is the better estimate of a dedicated core, and the worker counts use it.

The last lines size the safety stages for one accelerator producing --target images/s: PreFilter (image
filters, before annotation) on every image, PostFilter (text filters) on every image's --texts-per-image texts.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import random
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "camera", "coins")
NOUNS = ("dog", "bicycle", "street sign", "kitchen", "bus", "market stall", "mountain lake", "birthday cake",
         "parking lot", "storefront", "child", "laptop", "train station", "bowl of soup", "football match")
ADJS = ("red", "old", "crowded", "small", "wet", "sunlit", "wooden", "empty", "colourful", "blurry")
PLACES = ("next to a tree", "on a table", "in the rain", "at night", "near the beach", "in a city street",
          "under a bridge", "inside a shop")
PII = ("VISA 4111 1111 1111 1111", "IBAN GB82 WEST 1234 5698 7654 32", "Call +1 212-555-0198",
       "jane.doe@example.com", "SSN 512-38-4476", "host 192.168.10.4", "www.example.org/menu")


def photos(size: int, n: int) -> list[bytes]:
  """n JPEGs (quality 90) of real photographs, long side = size."""
  from PIL import Image
  from skimage import data as skdata
  out = []
  for i in range(n):
    arr = getattr(skdata, PHOTOS[i % len(PHOTOS)])()
    img = Image.fromarray(arr).convert("RGB")
    scale = size / max(img.size)
    img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.Resampling.BILINEAR)
    if i >= len(PHOTOS):  # distinct bytes per item
      img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if i % 2 else img.rotate(180)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90 - i % 7)
    out.append(buf.getvalue())
  return out


def caption(rng: random.Random) -> str:
  return f"A {rng.choice(ADJS)} {rng.choice(NOUNS)} {rng.choice(PLACES)}."


def ocr(rng: random.Random) -> str:
  lines = [rng.choice(["OPEN 7 DAYS", "TOTAL 23.40", "NO PARKING", "EXIT", "Menu of the day", "SALE -30%",
                       "Platform 4", "Thank you for shopping"]) for _ in range(rng.randint(1, 5))]
  if rng.random() < 0.2:
    lines.insert(rng.randrange(len(lines) + 1), rng.choice(PII))
  return "\n".join(lines)


def texts(n: int, seed: int = 0) -> list[str]:
  """Half captions, half OCR-like texts."""
  rng = random.Random(seed)
  return [caption(rng) if i % 2 == 0 else ocr(rng) for i in range(n)]


def hash_list(path: str, algorithm: str, n: int, extra: list[str] = ()) -> str:
  """An operator-style list of n random digests (plus `extra`) at `path`; returns a file:// URL."""
  rng = np.random.default_rng(0)
  width = {"sha256": 64, "md5": 32, "phash": 16}[algorithm]
  rows = ["".join(f"{b:02x}" for b in rng.integers(0, 256, width // 2, dtype=np.uint8)) for _ in range(n)]
  with open(path, "w") as f:
    f.write("\n".join(rows + list(extra)) + "\n")
  return f"file://{path}"


def measure(fn, items: list, seconds: float) -> dict:
  """Run fn(items) once to warm up, then repeatedly for >= seconds (at least once): items/s by wall and CPU time."""
  fn(items)
  n, wall0, cpu0 = 0, time.perf_counter(), time.process_time()
  while True:
    fn(items)
    n += len(items)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    if wall >= seconds:
      break
  return {"items": n, "wall_s": round(wall, 4), "cpu_s": round(cpu, 4),
          "items_per_s": round(n / wall, 2), "items_per_cpu_s": round(n / max(cpu, 1e-9), 2)}


def run(args: argparse.Namespace) -> list[dict]:
  """Every measurement row (filters, then stages)."""
  import tempfile

  with tempfile.TemporaryDirectory(prefix="safety-bench-") as tmp:
    return run_in(args, tmp)


def run_in(args: argparse.Namespace, tmp: str) -> list[dict]:
  """run() with the benchmark hash lists written under `tmp`."""
  import pyarrow as pa

  from pgbatch.safety import PostFilter, PreFilter, SafetyPolicy
  from pgbatch.safety.image import HashListFilter, NsfwFilter, phash
  from pgbatch.safety.pii import PiiFilter
  from pgbatch.safety.policy import WORDLIST_LANGUAGES
  from pgbatch.safety.text import ToxicityFilter, WordlistFilter

  imgs = photos(args.image_size, args.images)
  txts = texts(args.texts)
  sha_uri = hash_list(f"{tmp}/list.sha256", "sha256", args.hashes)
  ph_uri = hash_list(f"{tmp}/list.phash", "phash", args.hashes)
  policy = SafetyPolicy.default()
  nsfw = NsfwFilter(threads=1)
  rows = []

  def add(kind: str, name: str, fn, items: list, **extra) -> None:
    r = {"kind": kind, "filter": name, **measure(fn, items, args.seconds), **extra}
    rows.append(r)
    if not args.json:
      print(f"{kind:6s} {name:28s} {r['items_per_s']:10.1f} /s wall  {r['items_per_cpu_s']:10.1f} /s cpu"
            f"  ({r['items']} items)", flush=True)

  size = {"image_long_side": args.image_size}
  add("image", "hashlist sha256", HashListFilter(sha_uri, "sha256").score, imgs, list_size=args.hashes, **size)
  add("image", "hashlist phash", HashListFilter(ph_uri, "phash").score, imgs, list_size=args.hashes, **size)
  add("image", "phash only", lambda b: [phash(x) for x in b], imgs, **size)
  add("image", "nsfw (decode+model)", nsfw.score, imgs, batch=len(imgs), **size)
  add("text", "toxicity", ToxicityFilter().score, txts)
  add("text", "wordlist en", WordlistFilter(["en"]).score, txts)
  add("text", f"wordlist all {len(WORDLIST_LANGUAGES)} languages", WordlistFilter(list(WORDLIST_LANGUAGES)).score,
      txts)
  add("text", "pii", PiiFilter(policy.pii.entities, policy.pii.language).score, txts)

  pre = PreFilter(policy)
  pre._loaded["nsfw"] = nsfw  # the single-threaded session
  batch = {"key": np.array([f"k{i}" for i in range(len(imgs))], dtype=object),
           "image_bytes": np.array(imgs + [None], dtype=object)[:len(imgs)],
           "status": np.array(["ok"] * len(imgs), dtype=object)}
  add("stage", "PreFilter defaults (images)", lambda b: pre(b[0]), [batch], images_per_item=len(imgs), **size)
  hl = SafetyPolicy.model_validate({"hashlist": {"enabled": True, "uri": sha_uri}})
  pre_hl = PreFilter(hl)
  pre_hl._loaded["nsfw"] = nsfw
  add("stage", "PreFilter + hashlist sha256", lambda b: pre_hl(b[0]), [batch], images_per_item=len(imgs), **size)

  k = args.texts_per_image
  n_rows = max(1, len(txts) // k)
  text_type = pa.struct([("text", pa.string()), ("prompt", pa.string()), ("num_tokens", pa.int32()),
                         ("truncated", pa.bool_())])
  cols = {f"text_{j}": pa.array([{"text": txts[(i * k + j) % len(txts)], "prompt": "p", "num_tokens": 1,
                                  "truncated": False} for i in range(n_rows)], text_type) for j in range(k)}
  table = pa.table({"key": [f"k{i}" for i in range(n_rows)], "status": ["ok"] * n_rows, **cols})
  post = PostFilter(policy, text_fields=list(cols))
  add("stage", f"PostFilter defaults ({k} texts/image)", lambda t: post(t[0]), [table], images_per_item=n_rows)

  for r in rows:  # stage rates in images/s
    if r["kind"] == "stage":
      r["images_per_s"] = round(r["items_per_s"] * r["images_per_item"], 2)
      r["images_per_cpu_s"] = round(r["items_per_cpu_s"] * r["images_per_item"], 2)
  return rows


def sizing(rows: list[dict], target: float, texts_per_image: int) -> dict:
  """CPU workers (1 core each) per accelerator at `target` images/s, from the stages' CPU-time rates."""
  stage = {r["filter"]: r for r in rows if r["kind"] == "stage"}
  pre = stage["PreFilter defaults (images)"]["images_per_cpu_s"]
  pre_hl = stage["PreFilter + hashlist sha256"]["images_per_cpu_s"]
  post = stage[f"PostFilter defaults ({texts_per_image} texts/image)"]["images_per_cpu_s"]
  need = {"pre": math.ceil(target / pre), "post": math.ceil(target / post)}
  return {"kind": "sizing", "target_images_per_s": target, "texts_per_image": texts_per_image,
          "pre_images_per_worker_s": pre, "post_images_per_worker_s": post,
          "pre_workers": need["pre"], "post_workers": need["post"], "workers": need["pre"] + need["post"],
          "workers_with_hashlist": math.ceil(target / pre_hl) + need["post"]}


def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--seconds", type=float, default=3.0, help="minimum timed seconds per filter (default 3)")
  ap.add_argument("--images", type=int, default=32, help="images per batch (default 32)")
  ap.add_argument("--texts", type=int, default=256, help="texts per batch (default 256)")
  ap.add_argument("--image-size", type=int, default=1024, help="long side of the JPEGs in pixels (default 1024)")
  ap.add_argument("--hashes", type=int, default=100_000, help="entries in the benchmark hash lists (default 1e5)")
  ap.add_argument("--texts-per-image", type=int, default=2, help="text tasks per image, e.g. caption + OCR")
  ap.add_argument("--target", type=float, default=500.0, help="accelerator images/s to keep up with (default 500)")
  ap.add_argument("--json", action="store_true", help="one JSON object per line instead of a table")
  args = ap.parse_args(argv)
  if min(args.images, args.texts, args.texts_per_image) < 1 or args.texts < args.texts_per_image:
    ap.error("--images, --texts and --texts-per-image must be >= 1, and --texts >= --texts-per-image")
  if not args.json:
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.2f}; one worker = one single-threaded CPU", flush=True)
  rows = run(args)
  size = sizing(rows, args.target, args.texts_per_image)
  if args.json:
    for r in rows + [size]:
      print(json.dumps(r))
  else:
    print(f"PreFilter  (defaults: nsfw)        {size['pre_images_per_worker_s']:8.1f} images/s per worker -> "
          f"{size['pre_workers']} workers")
    print(f"PostFilter ({args.texts_per_image} texts/image, defaults) {size['post_images_per_worker_s']:8.1f} images/s "
          f"per worker -> {size['post_workers']} workers")
    print(f"CPU workers per accelerator at {args.target:g} images/s: {size['workers']} "
          f"({size['workers_with_hashlist']} with a sha256 hash list enabled)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
