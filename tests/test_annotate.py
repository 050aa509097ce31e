"""`pgbatch.annotate` without Ray: the real tiny model, tokenizer and Engine on one batch of every kind of row."""
import numpy as np
import pytest

import pipeline_helpers as H
from pgbatch import annotate, schema, tasks, tokenizer
from pgbatch.engine import Engine
from pgbatch.model import loading

TASKS = [
    {"name": "cap", "kind": "caption", "lang": "en", "max_new_tokens": 5},
    {"name": "qa", "kind": "answer", "lang": "en", "question_field": "question", "max_new_tokens": 3},
    {"name": "boxes", "kind": "detect", "classes": ["cat", "dog"], "max_new_tokens": 6},
]


class FlakyEngine:
  """The real Engine, failing any batch that holds an image whose first pixel is 255 (a poisoned row)."""

  def __init__(self, engine):
    self.engine, self.calls = engine, []

  def __getattr__(self, name):
    return getattr(self.engine, name)

  def annotate(self, images, prompts, max_new_tokens):
    self.calls.append(len(images))
    if (np.asarray(images)[:, 0, 0, 0] == 255).any():
      raise RuntimeError("poisoned batch")
    return self.engine.annotate(images, prompts, max_new_tokens)


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
  ckpt, tok = H.tiny_model(tmp_path_factory.mktemp("model"))
  model = loading.load(ckpt, dtype="float32")
  return Engine(model, batch_size=4), tokenizer.load(tok)


def _batch(n, size):
  rng = np.random.default_rng(0)
  pixels = rng.integers(0, 250, (n, size, size, 3), dtype=np.uint8)
  return pixels


def test_one_batch_of_every_kind_of_row(parts):
  engine, tok = parts
  flaky = FlakyEngine(engine)
  fatal = []
  annotator = annotate.Annotator(flaky, tok, [tasks.make_task(t) for t in TASKS], is_fatal=fatal.append)
  n, size = 6, engine.image_size
  pixels = _batch(n, size)
  pixels[3, 0, 0, 0] = 255                      # row 3: the model fails on it
  status = ["ok", "ok", "error", "ok", "ok", "filtered"]
  decode_error = {"stage": "decode", "type": "UnidentifiedImageError", "message": "not an image"}
  errors = [None, None, decode_error, None, None, None]
  metadata = ['{"question": "what is it?"}', '{"json": {"question": "which animal?"}}', None,
              '{"question": "why?"}', "{}", '{"question": "x?"}']   # row 4: no question -> its prompt fails
  out = annotator(pixels, status, errors, [640, 320, None, 100, 50, 20], [480, 200, None, 80, 40, 10], metadata)

  assert out.status == ["ok", "ok", "error", "error", "error", "filtered"]
  assert out.errors[2] == decode_error                                  # passed through untouched
  assert out.errors[3]["stage"] == "annotate" and out.errors[3]["message"] == "poisoned batch"
  assert out.errors[4]["stage"] == "annotate" and out.errors[4]["type"] == "PromptError"
  assert [e is None for e in out.errors] == [True, True, False, False, False, True]
  assert len(fatal) >= 2 and all(str(e) == "poisoned batch" for e in fatal)  # every failure was offered first
  assert flaky.calls[0] == 3 and flaky.calls[-1] == 1                     # halved down to the poisoned row
  for name, typ in (("cap", schema.TEXT_TYPE), ("qa", schema.TEXT_TYPE), ("boxes", schema.DETECT_TYPE)):
    col = out.columns[name]
    assert col.type == typ and len(col) == n
    col.validate(full=True)
    assert [v is None for v in col.to_pylist()] == [False, False, True, True, True, True]
  cap = out.columns["cap"].to_pylist()[0]
  assert cap["prompt"] == "caption en" and 1 <= cap["num_tokens"] <= 5
  assert cap["num_tokens"] == 5 if cap["truncated"] else True   # truncated: the budget ran out before EOS
  assert not cap["truncated"] if cap["num_tokens"] < 5 else True
  assert [r["prompt"] for r in out.columns["qa"].to_pylist()[:2]] == ["answer en what is it?", "answer en which animal?"]
  assert out.columns["boxes"].to_pylist()[0]["prompt"] == "detect cat ; dog"
  assert status[3] == "ok" and errors[3] is None                          # the caller's lists are not changed


def test_same_rows_alone_or_in_a_batch(parts):
  """A row's result does not depend on the rows it is batched with (padding, buckets)."""
  engine, tok = parts
  annotator = annotate.Annotator(engine, tok, [tasks.make_task(TASKS[0])])
  pixels = _batch(3, engine.image_size)
  together = annotator(pixels, ["ok"] * 3, [None] * 3, [10] * 3, [10] * 3).columns["cap"].to_pylist()
  alone = [annotator(pixels[i:i + 1], ["ok"], [None], [10], [10]).columns["cap"].to_pylist()[0] for i in range(3)]
  assert together == alone


def test_prompt_cache_is_bounded(parts, monkeypatch):
  engine, tok = parts
  monkeypatch.setattr(annotate, "PROMPT_CACHE_SIZE", 3)
  annotator = annotate.Annotator(engine, tok, [tasks.make_task(TASKS[1])])
  ids = [annotator.tokens(f"answer en question {i}") for i in range(7)]
  assert len(annotator._cache) <= 3  # pylint: disable=protected-access
  assert ids[6] == tok.encode_prompt("answer en question 6") and annotator.tokens("answer en question 6") is ids[6]


def test_question_fields():
  assert annotate.question_fields('{"json": {"question": "a?"}, "txt": "t"}')["question"] == "a?"
  assert annotate.question_fields('{"question": "col", "json": {"question": "side"}}')["question"] == "col"
  assert annotate.question_fields(None) == {} and annotate.question_fields("not json") == {}
  assert annotate.question_fields("[1, 2]") == {}
