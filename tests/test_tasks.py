"""Task kinds: specs, prompts, the detect/segment parsers over a corpus of model outputs, pixel boxes, masks, RLE.

Segment tests run the real VQ-VAE decoder (random weights written in the `vae-oid.npz` layout) end to end;
COCO compatibility is checked with pycocotools.
"""
import numpy as np
import pyarrow as pa
import pytest
from pycocotools import mask as mask_utils

from pgbatch import masks as M
from pgbatch import schema as S
from pgbatch import tasks as T
from pgbatch.model import vqvae

CLASSES = ["car", "person", "traffic light"]


def loc(*vs):
  return "".join(f"<loc{v:04d}>" for v in vs)


def seg(*vs):
  return "".join(f"<seg{v:03d}>" for v in vs)


B = loc(100, 200, 300, 400)  # a valid box
S16 = seg(*range(0, 128, 8))  # 16 valid seg tokens


@pytest.fixture(scope="module")
def detect():
  return T.make_task({"name": "objects", "kind": "detect", "classes": CLASSES})


@pytest.fixture(scope="module")
def vae_path(tmp_path_factory):
  return vqvae.write_random_vae(str(tmp_path_factory.mktemp("vae") / "vae-oid.npz"), seed=3, emb_dim=16)


@pytest.fixture(scope="module")
def vae(vae_path):
  return vqvae.load(vae_path)


@pytest.fixture(scope="module")
def segment(vae):
  return T.make_task({"name": "segs", "kind": "segment", "classes": ["cat", "dog"]}, vae=vae)


# ---------------------------------------------------------------------------------------------------------
# Specs and prompts

def test_prompts_per_kind():
  assert T.make_task({"name": "c", "kind": "caption"}).prompt() == "caption en"
  assert T.make_task({"name": "c", "kind": "caption", "lang": "pt-BR"}).prompt(None) == "caption pt-BR"
  assert T.make_task({"name": "o", "kind": "ocr"}).prompt({"anything": 1}) == "ocr"
  assert T.make_task({"name": "d", "kind": "detect", "classes": CLASSES}).prompt() == \
      "detect car ; person ; traffic light"
  assert T.make_task({"name": "s", "kind": "segment", "classes": ["cat"]}).prompt() == "segment cat"
  fixed = T.make_task({"name": "q", "kind": "answer", "lang": "de", "question": "  Was ist\n das? "})
  assert fixed.prompt() == "answer de Was ist das?"
  per_image = T.make_task({"name": "q", "kind": "answer", "question_field": "question"})
  assert per_image.prompt({"question": "how many cars?"}) == "answer en how many cars?"
  assert per_image.prompt({"question": " what\tcolor\n is it "}) == "answer en what color is it"
  for bad in (None, {}, {"question": ""}, {"question": "  "}, {"question": 3}):
    with pytest.raises(T.PromptError, match="question"):
      per_image.prompt(bad)


def test_class_names_are_normalized_in_prompt_and_spec():
  t = T.make_task({"name": "d", "kind": "detect", "classes": ["  traffic \n light", "car"]})
  assert t.classes == ("traffic light", "car")
  assert t.prompt() == "detect traffic light ; car"


def test_default_decode_lengths_and_spec_round_trip():
  specs = [{"name": "c", "kind": "caption"}, {"name": "o", "kind": "ocr"},
           {"name": "q", "kind": "answer", "question": "why?"},
           {"name": "d", "kind": "detect", "classes": ["a", "b"]},
           {"name": "s", "kind": "segment", "classes": ["a"]}]
  got = [T.make_task(s) for s in specs]
  assert [t.max_new_tokens for t in got] == [64, 128, 32, 16 + 2 * 32, 16 + 48]
  for t in got:
    assert T.make_task(t.spec()) == t
    assert t.arrow_type == S.ARROW_TYPES[t.kind]
  assert T.make_task({"name": "c", "kind": "caption", "max_new_tokens": 7}).max_new_tokens == 7
  # None means "not given"
  assert T.make_task({"name": "c", "kind": "caption", "lang": None}).lang == "en"


@pytest.mark.parametrize("spec,where", [
    ({"name": "Bad-Name", "kind": "caption"}, r"tasks\[Bad-Name\]\.name"),
    ({"name": "x", "kind": "classify"}, r"tasks\[x\]\.kind"),
    ({"name": "x", "kind": "caption", "classes": ["a"]}, r"tasks\[x\]\.classes: not used by caption"),
    ({"name": "x", "kind": "ocr", "colour": 1}, r"tasks\[x\]\.colour: unknown field"),
    ({"name": "x", "kind": "caption", "lang": "english!"}, r"tasks\[x\]\.lang"),
    ({"name": "x", "kind": "detect"}, r"tasks\[x\]\.classes"),
    ({"name": "x", "kind": "detect", "classes": "car"}, r"tasks\[x\]\.classes"),
    ({"name": "x", "kind": "detect", "classes": ["car", "car "]}, r"tasks\[x\]\.classes\[1\]: duplicate"),
    ({"name": "x", "kind": "segment", "classes": ["a;b"]}, r"tasks\[x\]\.classes\[0\]"),
    ({"name": "x", "kind": "segment", "classes": ["<loc0001>"]}, r"tasks\[x\]\.classes\[0\]"),
    ({"name": "x", "kind": "detect", "classes": [""]}, r"tasks\[x\]\.classes\[0\]"),
    ({"name": "x", "kind": "answer"}, r"tasks\[x\]\.question"),
    ({"name": "x", "kind": "answer", "question": "a", "question_field": "q"}, r"tasks\[x\]\.question"),
    ({"name": "x", "kind": "answer", "question": "  "}, r"tasks\[x\]\.question"),
    ({"name": "x", "kind": "caption", "max_new_tokens": 0}, r"tasks\[x\]\.max_new_tokens"),
    ({"name": "x", "kind": "caption", "max_new_tokens": True}, r"tasks\[x\]\.max_new_tokens"),
    ({"name": "x", "kind": "caption", "max_new_tokens": 5000}, r"tasks\[x\]\.max_new_tokens"),
])
def test_invalid_specs_name_the_field(spec, where):
  with pytest.raises(T.TaskSpecError, match=where):
    T.make_task(spec)


def test_segment_without_decoder_says_how_to_attach_one():
  t = T.make_task({"name": "s", "kind": "segment", "classes": ["cat"]})
  with pytest.raises(RuntimeError, match="vqvae.load"):
    t.parse(B + S16 + " cat", 21, False, 10, 10)


# ---------------------------------------------------------------------------------------------------------
# Detection corpus: (text, truncated, expected boxes as (label, ymin, xmin, ymax, xmax) loc values,
# expected error reasons as substrings, in order)

DETECT_CORPUS = [
    # well-formed
    (B + " car", False, [("car", 100, 200, 300, 400)], []),
    (B + " car ; " + loc(0, 0, 1023, 1023) + " person", False,
     [("car", 100, 200, 300, 400), ("person", 0, 0, 1023, 1023)], []),
    (B + " car ; " + B + " car ; " + loc(1, 2, 3, 4) + " car", False,
     [("car", 100, 200, 300, 400)] * 2 + [("car", 1, 2, 3, 4)], []),
    (B + " traffic light", False, [("traffic light", 100, 200, 300, 400)], []),
    (B + " Traffic  Light", False, [("traffic light", 100, 200, 300, 400)], []),
    (B + " car;" + B + " person", False, [("car", 100, 200, 300, 400), ("person", 100, 200, 300, 400)], []),
    (B + " car" + B + " person", False, [("car", 100, 200, 300, 400), ("person", 100, 200, 300, 400)], []),
    (B + " car ;", False, [("car", 100, 200, 300, 400)], []),
    ("  " + B + " car  ", False, [("car", 100, 200, 300, 400)], []),
    (B + " car<eos>" + B + " person", False, [("car", 100, 200, 300, 400)], []),
    (B + " car</s> trailing junk", False, [("car", 100, 200, 300, 400)], []),
    (loc(0, 0, 1, 1) + " car", False, [("car", 0, 0, 1, 1)], []),
    (loc(1022, 1022, 1023, 1023) + " car", False, [("car", 1022, 1022, 1023, 1023)], []),
    # empty outputs
    ("", False, [], []),
    ("; ; ;", False, [], []),
    # wrong token counts
    (loc(100, 200, 300) + " car", False, [], ["expected 4 location tokens, got 3"]),
    (loc(100, 200, 300, 400, 500) + " car", False, [], ["expected 4 location tokens, got 5"]),
    (loc(1) + " car " + loc(2, 3, 4), False, [],
     ["expected 4 location tokens, got 1", "expected 4 location tokens, got 3"]),
    # inverted / empty boxes
    (loc(300, 200, 100, 400) + " car", False, [], ["inverted box"]),
    (loc(100, 400, 300, 200) + " car", False, [], ["inverted box"]),
    (loc(100, 200, 100, 400) + " car", False, [], ["inverted box"]),
    # out-of-range value (not a real token, but text can say anything)
    ("<loc9999><loc0200><loc0300><loc0400> car", False, [], ["location value above 1023"]),
    # labels
    (B + " bus ; " + B + " car", False, [("car", 100, 200, 300, 400)], ["label 'bus' is not one of"]),
    (B + " car person", False, [], ["label 'car person' is not one of"]),
    (B, False, [], ["missing label"]),
    (B + " ; " + B + " car", False, [("car", 100, 200, 300, 400)], ["missing label"]),
    # text between or around groups
    ("hello world", False, [], ["text outside an object"]),
    ("Sure! " + B + " car", False, [("car", 100, 200, 300, 400)], ["text outside an object"]),
    (B + " car ; some text ; " + B + " person", False,
     [("car", 100, 200, 300, 400), ("person", 100, 200, 300, 400)], ["text outside an object"]),
    (B + " car; person", False, [("car", 100, 200, 300, 400)], ["text outside an object"]),
    ("<unk><pad> car", False, [], ["text outside an object"]),
    ("<loc100><loc0200><loc0300><loc0400> car", False, [],
     ["text outside an object", "expected 4 location tokens, got 3"]),
    ("<LOC0100>" + loc(200, 300, 400) + " car", False, [],
     ["text outside an object", "expected 4 location tokens, got 3"]),
    # stray seg tokens
    (seg(1) + B + " car", False, [("car", 100, 200, 300, 400)], ["segmentation tokens without a box"]),
    (B + S16 + " car", False, [("car", 100, 200, 300, 400)], ["unexpected segmentation tokens"]),
    # truncated by max_new_tokens
    (B + " car ; " + loc(100, 200), True, [("car", 100, 200, 300, 400)],
     ["expected 4 location tokens, got 2 (output truncated)"]),
    (B + " car ; <loc0100><loc02", True, [("car", 100, 200, 300, 400)],
     ["expected 4 location tokens, got 1 (output truncated)"]),
    (B + " car ; " + B, True, [("car", 100, 200, 300, 400)], ["missing label (output truncated)"]),
    (loc(100, 200) + " car ; " + B, True, [], ["got 2", "missing label (output truncated)"]),
    # garbage
    ("<<<>>> ;;; loc0001 <seg>", False, [], ["text outside an object", "text outside an object"]),
    ("<loc0001> <loc0002>\n<loc0003>  <loc0004>   car", False, [("car", 1, 2, 3, 4)], []),
    ("<loc0001> <loc0002> <loc0003> car", False, [], ["expected 4 location tokens, got 3"]),
    ("\x00\ufffd ünïcödé 🚗", False, [], ["text outside an object"]),
    ("<loc0001>" * 400, True, [], ["expected 4 location tokens, got 400 (output truncated)"]),
]


def test_corpus_is_large_enough():
  assert len(DETECT_CORPUS) >= 30


@pytest.mark.parametrize("text,truncated,boxes,reasons", DETECT_CORPUS)
def test_detect_parser_corpus(detect, text, truncated, boxes, reasons):
  row = detect.parse(text, 17, truncated, 640, 480)
  got = [(o["label"], *(round(o[k] * 1024) for k in ("ymin", "xmin", "ymax", "xmax"))) for o in row["objects"]]
  assert got == boxes
  assert len(row["parse_errors"]) == len(reasons), row["parse_errors"]
  for err, reason in zip(row["parse_errors"], reasons):
    assert reason in err["reason"], (err, reason)
    assert err["part"].strip() and err["part"] in text  # each error quotes the model text verbatim
  if not truncated:
    assert all("(output truncated)" not in e["reason"] for e in row["parse_errors"])
  assert row["raw"] == T.clean_text(text)
  assert row["num_tokens"] == 17 and row["truncated"] is truncated
  assert row["prompt"] == "detect car ; person ; traffic light"
  # every result is a valid value of the column type
  pa.array([row], type=S.DETECT_TYPE).validate(full=True)


def test_parsers_never_raise_on_random_output(detect, segment):
  """Seeded fuzz: object-like runs with wrong counts, bad values and junk always parse to a valid value."""
  rng = np.random.default_rng(1)
  junk = ["<loc9999>", "<seg999>", "<loc00", "<seg", " unicorn", "\n", "ö", ">", "<", ";", " ", "<eos>", "</s>"]

  def fake_object():
    parts = [loc(*rng.integers(0, 1024, rng.choice([4, 4, 4, 3, 5])))]
    parts.append(seg(*rng.integers(0, 128, rng.choice([16, 16, 0, 15, 17]))))
    parts.append(rng.choice([" car", " person", " cat", " dog", " Dog", " unicorn", ""]))
    if rng.random() < 0.2:
      parts.insert(int(rng.integers(0, 4)), rng.choice(junk))
    return "".join(parts)

  texts = [rng.choice([" ; ", ";", ""]).join(fake_object() for _ in range(rng.integers(0, 6)))
           for _ in range(300)]
  texts = [t[:int(rng.integers(0, len(t) + 1))] if rng.random() < 0.2 else t for t in texts]  # cut anywhere
  truncated = [bool(x) for x in rng.integers(0, 2, len(texts))]
  sizes = rng.integers(1, 2000, (len(texts), 2))
  for task, typ in ((detect, S.DETECT_TYPE), (segment, S.SEGMENT_TYPE)):
    rows = task.parse_batch(texts, [7] * len(texts), truncated, sizes[:, 0], sizes[:, 1])
    pa.array(rows, type=typ).validate(full=True)
    for row, (w, h) in zip(rows, sizes):
      for o in row["objects"]:
        assert 0 <= o["ymin"] < o["ymax"] < 1 and 0 <= o["xmin"] < o["xmax"] < 1
        assert 0 <= o["ymin_px"] <= o["ymax_px"] <= h and 0 <= o["xmin_px"] <= o["xmax_px"] <= w
        if task is segment and o["mask"] is not None:
          assert (o["mask"]["height"], o["mask"]["width"]) == (h, w) and sum(o["mask"]["rle"]) == w * h
  assert sum(len(r["objects"]) for r in rows) > 20 and sum(len(r["parse_errors"]) for r in rows) > 100


def test_unknown_label_keeps_the_rest_and_nothing_is_lost(detect):
  text = B + " car ; " + loc(10, 20, 30, 40) + " unicorn ; " + loc(5, 6, 7, 8) + " person"
  row = detect.parse(text, 30, False, 100, 100)
  assert [o["label"] for o in row["objects"]] == ["car", "person"]
  assert row["parse_errors"] == [{"part": loc(10, 20, 30, 40) + " unicorn",
                                  "reason": "label 'unicorn' is not one of the task's classes"}]


# ---------------------------------------------------------------------------------------------------------
# Coordinates

@pytest.mark.parametrize("width,height", [(640, 480), (1, 1), (1024, 1024), (2000, 31), (37, 4000)])
def test_fractions_and_pixels(detect, width, height):
  text = loc(0, 0, 1023, 1023) + " car ; " + loc(512, 256, 768, 1000) + " person"
  full, part = detect.parse(text, 11, False, width, height)["objects"]
  assert (full["ymin"], full["xmin"]) == (0.0, 0.0)
  assert full["ymax"] == full["xmax"] == 1023 / 1024
  assert (full["ymin_px"], full["xmin_px"]) == (0, 0)
  assert full["ymax_px"] == int(np.floor(1023 / 1024 * height + 0.5)) <= height
  assert full["xmax_px"] == int(np.floor(1023 / 1024 * width + 0.5)) <= width
  assert (part["ymin"], part["xmin"], part["ymax"], part["xmax"]) == (0.5, 0.25, 0.75, 1000 / 1024)
  for k, size in (("ymin", height), ("xmin", width), ("ymax", height), ("xmax", width)):
    assert part[f"{k}_px"] == int(np.floor(part[k] * size + 0.5))
    assert 0 <= part[f"{k}_px"] <= size
  # fractions survive float32 exactly (v / 1024 is a dyadic rational)
  arr = pa.array([{"objects": [full, part], "raw": "", "num_tokens": 1, "truncated": False, "parse_errors": []}],
                 type=S.DETECT_TYPE)
  back = arr.to_pylist()[0]["objects"]
  assert [o["xmax"] for o in back] == [1023 / 1024, 1000 / 1024]


def test_pixel_rounding_halves_up():
  obj = {"label": "a", "ymin": 0.5, "xmin": 0.5, "ymax": 0.75, "xmax": 0.25}
  px = T.to_pixels(obj, width=3, height=5)   # 1.5 -> 2, 2.5 -> 3, 3.75 -> 4, 0.75 -> 1
  assert (px["ymin_px"], px["xmin_px"], px["ymax_px"], px["xmax_px"]) == (3, 2, 4, 1)
  assert obj == {"label": "a", "ymin": 0.5, "xmin": 0.5, "ymax": 0.75, "xmax": 0.25}  # input untouched


def test_pixel_boxes_follow_each_rows_size(detect):
  rows = detect.parse_batch([B + " car"] * 3, [5, 5, 5], [False] * 3, [1024, 512, 100], [2048, 10, 100])
  assert [(r["objects"][0]["ymin_px"], r["objects"][0]["xmax_px"]) for r in rows] == [(200, 400), (1, 200), (10, 39)]


# ---------------------------------------------------------------------------------------------------------
# Text kinds and batches

def test_text_kinds_parse():
  cap = T.make_task({"name": "cap", "kind": "caption"})
  assert cap.parse("  a dog on a beach \n", 7, False, 10, 10) == {
      "text": "a dog on a beach", "prompt": "caption en", "num_tokens": 7, "truncated": False}
  assert cap.parse("a cat<eos>junk", 3, False, 1, 1)["text"] == "a cat"
  assert cap.parse("", 1, False, 1, 1)["text"] == ""
  assert cap.parse(None, 0, True, 1, 1)["text"] == ""
  q = T.make_task({"name": "vqa", "kind": "answer", "question_field": "question"})
  rows = q.parse_batch(["beach", "two"], [2, 2], [False, True], [1, 1], [1, 1],
                       prompts=["answer en where?", "answer en how many?"])
  assert [(r["text"], r["prompt"], r["truncated"]) for r in rows] == [
      ("beach", "answer en where?", False), ("two", "answer en how many?", True)]
  # per-image prompts not given: the prompt field reads as null, not a made-up value
  row = q.parse("yes", 2, False, 1, 1)
  assert "prompt" not in row
  assert pa.array([row], type=S.TEXT_TYPE).to_pylist()[0]["prompt"] is None


def test_parse_batch_rejects_mismatched_lengths(detect):
  with pytest.raises(ValueError, match="widths"):
    detect.parse_batch(["a", "b"], [1, 1], [False, False], [10], [10, 10])
  with pytest.raises(ValueError, match="prompts"):
    detect.parse_batch(["a", "b"], [1, 1], [False, False], [10, 10], [10, 10], prompts=["x"])
  assert detect.parse_batch([], [], [], [], []) == []


# ---------------------------------------------------------------------------------------------------------
# Segmentation

def test_segment_parser_codes_and_errors():
  objs, errs = T.parse_objects(B + S16 + " cat ; " + loc(1, 2, 3, 4) + seg(*[5] * 8) + " dog", ["cat", "dog"],
                               segment=True)
  assert [o["codes"] for o in objs] == [list(range(0, 128, 8)), None]
  assert len(errs) == 1 and "expected 16 segmentation tokens, got 8; box kept" in errs[0]["reason"]
  objs, errs = T.parse_objects(B + " cat", ["cat"], segment=True)   # missing seg tokens
  assert objs[0]["codes"] is None and "got 0" in errs[0]["reason"]
  objs, errs = T.parse_objects(B + seg(*[1] * 17) + " cat", ["cat"], segment=True)
  assert objs[0]["codes"] is None and "got 17" in errs[0]["reason"]
  objs, errs = T.parse_objects(B + seg(*[1] * 15, 200) + " cat", ["cat"], segment=True)
  assert objs[0]["codes"] is None and "code above 127" in errs[0]["reason"]
  objs, errs = T.parse_objects(B + seg(*[1] * 10), ["cat"], segment=True, truncated=True)
  assert objs == [] and errs[0]["reason"] == "missing label (output truncated)"


def test_segment_end_to_end_with_vqvae(segment, vae):
  codes = [np.arange(16) * 7 % 128, np.arange(16)[::-1] * 3]
  text = (loc(0, 0, 1023, 1023) + seg(*codes[0]) + " cat ; " + loc(256, 128, 768, 896) + seg(*codes[1]) + " dog"
          + " ; " + loc(10, 10, 20, 20) + seg(1, 2) + " dog ; " + B + S16 + " horse")
  w, h = 300, 200
  row = segment.parse(text, 60, False, w, h)
  assert [o["label"] for o in row["objects"]] == ["cat", "dog", "dog"]
  reasons = [e["reason"] for e in row["parse_errors"]]
  assert "expected 16 segmentation tokens, got 2; box kept without mask" in reasons[0]
  assert "label 'horse'" in reasons[1]
  logits = vae(np.stack(codes))
  for obj, m64 in zip(row["objects"][:2], logits):
    m = obj["mask"]
    assert (m["height"], m["width"]) == (h, w)
    mask = M.rle_decode(m["rle"], h, w)
    box = (obj["ymin_px"], obj["xmin_px"], obj["ymax_px"], obj["xmax_px"])
    np.testing.assert_array_equal(mask, M.paste_mask(m64, box, w, h))
    outside = mask.copy()
    outside[box[0]:box[2], box[1]:box[3]] = False
    assert not outside.any()
    assert 0 < mask.sum() < (box[2] - box[0]) * (box[3] - box[1])  # random decoder: structured, not trivial
    # COCO: pycocotools reads the stored RLE directly
    rle = mask_utils.frPyObjects({"size": [h, w], "counts": m["rle"]}, h, w)
    np.testing.assert_array_equal(mask_utils.decode(rle).astype(bool), mask)
    assert int(mask_utils.area(rle)) == int(mask.sum())
    x, y, bw, bh = mask_utils.toBbox(rle)
    assert box[1] <= x and x + bw <= box[3] and box[0] <= y and y + bh <= box[2]
  assert row["objects"][2]["mask"] is None
  pa.array([row], type=S.SEGMENT_TYPE).validate(full=True)


def test_segment_batch_decodes_once_and_matches_single_rows(segment, vae):
  calls = []

  def counting(codes):
    calls.append(len(codes))
    return vae(codes)

  t = segment.bind(counting)
  texts = [B + S16 + " cat", "nothing here", loc(0, 0, 512, 512) + seg(*[3] * 16) + " dog ; " + B + S16 + " cat"]
  sizes = [(50, 40), (10, 10), (64, 64)]
  rows = t.parse_batch(texts, [21, 3, 42], [False] * 3, [s[0] for s in sizes], [s[1] for s in sizes])
  assert calls == [3]
  for text, (w, h), row in zip(texts, sizes, rows):
    assert row == segment.parse(text, row["num_tokens"], False, w, h)
  assert rows[1]["objects"] == [] and rows[1]["parse_errors"][0]["reason"] == "text outside an object"
  assert T.make_task(t.spec()) == t  # the decoder is not part of the task's identity


def test_paste_mask_geometry():
  logits = np.full((64, 64), -1.0, np.float32)
  logits[:, :32] = 1.0   # left half inside
  m = M.paste_mask(logits, (10, 20, 30, 60), width=100, height=50)
  assert m.shape == (50, 100) and m.dtype == bool
  assert m[10:30, 20:40].all() and not m[10:30, 40:60].any()
  assert m.sum() == 20 * 20
  # all-positive logits fill exactly the pixel box; boxes are clipped to the image
  full = M.paste_mask(np.ones((64, 64), np.float32), (40, 90, 80, 130), width=100, height=50)
  assert full.sum() == 10 * 10 and full[40:50, 90:100].all()
  # an empty pixel box (tiny box on a small image) gives an empty mask, no crash
  assert not M.paste_mask(np.ones((64, 64), np.float32), (3, 3, 3, 5), 10, 10).any()
  # the big_vision rule: bilinear resize of the float logits, then > 0 (not a nearest-neighbour blow-up)
  ramp = np.tile(np.linspace(-1, 1, 64, dtype=np.float32), (64, 1))
  m = M.paste_mask(ramp, (0, 0, 8, 640), width=640, height=8)
  assert abs(int(m[0].sum()) - 320) <= 6


# ---------------------------------------------------------------------------------------------------------
# RLE

@pytest.fixture(scope="module")
def masks():
  rng = np.random.default_rng(0)
  out = [np.zeros((5, 7), bool), np.ones((5, 7), bool), np.eye(6, 9, dtype=bool), rng.random((31, 17)) > 0.5,
         np.ones((1, 1), bool), np.zeros((1, 1), bool)]
  blob = np.zeros((120, 90), bool)
  blob[20:70, 30:80] = True
  blob[0, 0] = True
  out.append(blob)
  return out


def test_rle_round_trip_and_coco_equivalence(masks):
  for m in masks:
    counts = M.rle_encode(m)
    assert sum(counts) == m.size and all(c >= 0 for c in counts) and all(c > 0 for c in counts[1:])
    np.testing.assert_array_equal(M.rle_decode(counts, *m.shape), m)
    h, w = m.shape
    ours = mask_utils.frPyObjects({"size": [h, w], "counts": counts}, h, w)
    ref = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
    assert ours["counts"] == ref["counts"], m.shape   # identical compressed COCO RLE
    np.testing.assert_array_equal(mask_utils.decode(ours).astype(bool), m)
  assert M.rle_encode(np.ones((2, 2), bool)) == [0, 4]
  assert M.rle_encode(np.zeros((2, 3), bool)) == [6]
  assert M.rle_encode(np.array([[0, 1], [1, 1]], bool)) == [1, 3]        # column-major: 0,1 | 1,1
  assert M.rle_encode(np.array([[0, 0], [1, 1]], bool)) == [1, 1, 1, 1]  # column-major: 0,1 | 0,1


def test_rle_decode_rejects_wrong_size():
  with pytest.raises(ValueError, match="3x3"):
    M.rle_decode([2, 2], 3, 3)
