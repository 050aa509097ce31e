"""Task kinds: the prompt each sends, how long it may decode, how its output is parsed, and its Arrow type.

One frozen `Task` dataclass covers every kind; the per-kind behaviour is a few pure functions keyed by
`task.kind`. Build tasks from job-spec dicts:

  t = make_task({"name": "objects", "kind": "detect", "classes": ["car", "person"]})
  t.prompt(None)                              # "detect car ; person"
  t.parse(text, num_tokens, truncated, w, h)  # python value of type `t.arrow_type`

Kinds (prompts as on the PaliGemma model cards):
  caption  `caption {lang}`              -> TEXT_TYPE
  ocr      `ocr`                         -> TEXT_TYPE
  answer   `answer {lang} {question}`    -> TEXT_TYPE; question fixed (`question`) or per image from the
                                            input row metadata (`question_field`)
  detect   `detect {a} ; {b}`            -> DETECT_TYPE
  segment  `segment {a} ; {b}`           -> SEGMENT_TYPE; needs the VQ-VAE mask decoder: the pipeline loads
                                            `model.vae` once per actor and passes it as
                                            `make_task(spec, vae=vqvae.load(uri))` (or `task.bind(vae)`).

Parsers take the decoded text (the tokenizer renders loc/seg pieces as `<loc0123>` / `<seg012>` and stops at
EOS) and never raise on model output: what parses is kept, what does not is recorded in `parse_errors`.

Box convention. `<locYMIN><locXMIN><locYMAX><locXMAX>`, each value v in 0..1023 is a bin of the model's
square input; we decode it as the box edge v / 1024 (as the PaliGemma demo does; big_vision *encodes*
training boxes with round(x * 1023), the difference is below 0.1%). The input is a plain squash of the
original image, so the fractions apply to the original image directly; pixel edges are
round(fraction * height|width), halves rounded up. A box must have ymax > ymin and xmax > xmin.

Mask layout. Segment masks are at the original resolution, covering the whole image (`height` x `width`
of the image), as COCO uncompressed RLE: `rle` are run lengths over the column-major (Fortran-order)
flattening of the mask, starting with a run of zeros (possibly 0). `{"size": [height, width],
"counts": rle}` is accepted by `pycocotools.mask.frPyObjects`. The 64x64 decoder output is resized to the
pixel box with PIL bilinear on the float logits and thresholded at > 0 (the big_vision evaluator's rule).
"""
from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, Callable, Optional, Sequence

import numpy as np
import pyarrow as pa

from pgbatch import masks
from pgbatch.schema import ARROW_TYPES, META_TASKS
from pgbatch.tokenizer import LOCS_PER_BOX, NUM_LOC, NUM_SEG, SEGS_PER_MASK

KINDS = ("caption", "ocr", "answer", "detect", "segment")
TEXT_KINDS = ("caption", "ocr", "answer")
NAME_RE = re.compile(r"^[a-z_][a-z0-9_]*$")
LANG_RE = re.compile(r"^[A-Za-z]{2,3}([-_][A-Za-z0-9]{2,8})*$")
SPEC_KEYS = ("name", "kind", "lang", "classes", "question", "question_field", "max_new_tokens")

# ---------------------------------------------------------------------------------------------------------
# Task


class TaskSpecError(ValueError):
  """A task spec is invalid; the message starts with the offending field, e.g. `tasks[objects].classes`."""


class PromptError(ValueError):
  """A per-image prompt cannot be built (e.g. the question field is missing from the row metadata)."""


@dataclasses.dataclass(frozen=True)
class Task:
  """One output column. Build with `make_task`; `vae` is only used (and required) by segment tasks."""
  name: str
  kind: str
  max_new_tokens: int
  lang: Optional[str] = None
  classes: tuple[str, ...] = ()
  question: Optional[str] = None
  question_field: Optional[str] = None
  vae: Optional[Callable[[np.ndarray], np.ndarray]] = dataclasses.field(default=None, compare=False, repr=False)

  @property
  def arrow_type(self) -> pa.DataType:
    return ARROW_TYPES[self.kind]

  @property
  def doc(self) -> str:
    what = {"caption": "caption", "ocr": "text read from the image", "answer": "answer",
            "detect": "detected boxes", "segment": "segmented instances"}[self.kind]
    prompt = self.prompt(None) if self.question_field is None else self.prompt({self.question_field: "…"})
    return f"{self.kind} task {self.name!r}: {what}; prompt {prompt!r}; null unless status is ok"

  def spec(self) -> dict:
    """The job-spec dict this task was built from (with defaults filled); `make_task(t.spec()) == t`."""
    out = {"name": self.name, "kind": self.kind, "max_new_tokens": self.max_new_tokens}
    for k in ("lang", "question", "question_field"):
      if getattr(self, k) is not None:
        out[k] = getattr(self, k)
    if self.classes:
      out["classes"] = list(self.classes)
    return out

  def bind(self, vae: Callable[[np.ndarray], np.ndarray]) -> "Task":
    """The same task with a mask decoder (`pgbatch.model.vqvae.load(uri)`) attached."""
    return dataclasses.replace(self, vae=vae)

  def prompt(self, metadata: Optional[dict] = None) -> str:
    """Prompt text (no BOS, no newline). `metadata`: the input row's metadata dict, used by question_field."""
    if self.kind == "caption":
      return f"caption {self.lang}"
    if self.kind == "ocr":
      return "ocr"
    if self.kind in ("detect", "segment"):
      return f"{self.kind} " + " ; ".join(self.classes)
    question = self.question
    if self.question_field is not None:
      value = (metadata or {}).get(self.question_field)
      if not isinstance(value, str) or not value.strip():
        raise PromptError(f"task {self.name!r}: metadata field {self.question_field!r} is missing or empty")
      question = value
    return f"answer {self.lang} {' '.join(question.split())}"

  def _static_prompt(self) -> Optional[str]:
    return None if self.question_field is not None else self.prompt(None)

  def parse(self, text: str, num_tokens: int, truncated: bool, width: int, height: int,
            prompt: Optional[str] = None) -> dict:
    """Decoded output of one image -> value of `arrow_type`. `width`/`height`: original image size.

    `prompt` is recorded in the result; it defaults to the task's fixed prompt. For per-image questions
    pass the prompt used (when omitted, the `prompt` key is left out and reads as null).
    """
    return self.parse_batch([text], [num_tokens], [truncated], [width], [height],
                            None if prompt is None else [prompt])[0]

  def parse_batch(self, texts: Sequence[str], num_tokens: Sequence[int], truncated: Sequence[bool],
                  widths: Sequence[int], heights: Sequence[int],
                  prompts: Optional[Sequence[Optional[str]]] = None) -> list[dict]:
    """`parse` over many images; segment tasks decode all their masks in one VQ-VAE call."""
    n = len(texts)
    given = {"num_tokens": num_tokens, "truncated": truncated, "widths": widths, "heights": heights}
    if prompts is not None:
      given["prompts"] = prompts
    for what, values in given.items():
      if len(values) != n:
        raise ValueError(f"task {self.name!r}: {len(values)} {what} for {n} texts")
    prompts = list(prompts) if prompts is not None else [self._static_prompt()] * n
    common = [{"num_tokens": int(k), "truncated": bool(t)} for k, t in zip(num_tokens, truncated)]
    for c, p in zip(common, prompts):
      if p is not None:
        c["prompt"] = p
    if self.kind in TEXT_KINDS:
      return [{"text": clean_text(s).strip(), **c} for s, c in zip(texts, common)]
    if self.kind == "segment" and self.vae is None:
      raise RuntimeError(f"segment task {self.name!r} has no mask decoder: "
                         "make_task(spec, vae=pgbatch.model.vqvae.load(model.vae)) or task.bind(vae)")
    rows = []
    for s, c, w, h in zip(texts, common, widths, heights):
      objects, errors = parse_objects(s, self.classes, segment=self.kind == "segment", truncated=c["truncated"])
      rows.append({"objects": [to_pixels(o, int(w), int(h)) for o in objects], "raw": clean_text(s), **c,
                   "parse_errors": errors})
    if self.kind == "segment":
      masks.attach_masks(rows, widths, heights, self.vae)
    return rows


def default_max_new_tokens(kind: str, num_classes: int = 0) -> int:
  """Decode budget. A box is ~4 loc + 1..3 label + 2 separator tokens, an instance 16 seg tokens more;
  budgets allow ~3 boxes or ~2 instances per class. Decoding stops early once every row emitted EOS."""
  return {"caption": 64, "ocr": 128, "answer": 32,
          "detect": 16 + 32 * num_classes, "segment": 16 + 48 * num_classes}[kind]


def _err(task: str, key: str, msg: str) -> TaskSpecError:
  return TaskSpecError(f"tasks[{task}].{key}: {msg}")


def make_task(spec: dict, vae: Optional[Callable[[np.ndarray], np.ndarray]] = None) -> Task:
  """Job-spec dict -> Task. Unknown or misplaced fields are errors; `None` values mean "not given"."""
  if not isinstance(spec, dict):
    raise TaskSpecError(f"tasks: each task must be a mapping, got {type(spec).__name__}")
  spec = {k: v for k, v in spec.items() if v is not None}
  name = spec.get("name")
  if not isinstance(name, str) or not NAME_RE.match(name):
    raise TaskSpecError(f"tasks[{name}].name: must match {NAME_RE.pattern} (it names the output column)")
  kind = spec.get("kind")
  if kind not in KINDS:
    raise _err(name, "kind", f"{kind!r} is not one of {', '.join(KINDS)}")
  allowed = {"name", "kind", "max_new_tokens"} | {
      "caption": {"lang"}, "ocr": set(), "answer": {"lang", "question", "question_field"},
      "detect": {"classes"}, "segment": {"classes"}}[kind]
  for key in spec:
    if key not in allowed:
      what = "unknown field" if key not in SPEC_KEYS else f"not used by {kind} tasks"
      raise _err(name, key, what)
  lang = None
  if kind in ("caption", "answer"):
    lang = spec.get("lang", "en")
    if not isinstance(lang, str) or not LANG_RE.match(lang):
      raise _err(name, "lang", f"{lang!r} is not a language code like en, de, pt-BR")
  classes: tuple[str, ...] = ()
  if kind in ("detect", "segment"):
    raw = spec.get("classes")
    if isinstance(raw, str) or not isinstance(raw, (list, tuple)) or not raw:
      raise _err(name, "classes", "must be a non-empty list of class names")
    cleaned = []
    for i, c in enumerate(raw):
      if not isinstance(c, str) or not " ".join(c.split()):
        raise _err(name, f"classes[{i}]", "must be a non-empty string")
      c = " ".join(c.split())
      if any(ch in c for ch in ";<>"):
        raise _err(name, f"classes[{i}]", f"{c!r} may not contain ';', '<' or '>'")
      if c in cleaned:
        raise _err(name, f"classes[{i}]", f"duplicate class {c!r}")
      cleaned.append(c)
    classes = tuple(cleaned)
  question = question_field = None
  if kind == "answer":
    question, question_field = spec.get("question"), spec.get("question_field")
    if (question is None) == (question_field is None):
      raise _err(name, "question", "give exactly one of question (fixed) or question_field (per image)")
    if question is not None and (not isinstance(question, str) or not question.strip()):
      raise _err(name, "question", "must be a non-empty string")
    if question_field is not None and (not isinstance(question_field, str) or not question_field):
      raise _err(name, "question_field", "must be the name of a metadata field")
    question = " ".join(question.split()) if question is not None else None
  max_new = spec.get("max_new_tokens", default_max_new_tokens(kind, len(classes)))
  if isinstance(max_new, bool) or not isinstance(max_new, int) or not 1 <= max_new <= 4096:
    raise _err(name, "max_new_tokens", f"must be an integer in [1, 4096], got {max_new!r}")
  return Task(name=name, kind=kind, max_new_tokens=max_new, lang=lang, classes=classes, question=question,
              question_field=question_field, vae=vae)


# ---------------------------------------------------------------------------------------------------------
# Parsing

_TOKEN_RE = re.compile(r"<loc(\d{4})>|<seg(\d{3})>|;")
_END_MARKERS = ("<eos>", "</s>")


def clean_text(text: Optional[str]) -> str:
  """Text up to EOS. The tokenizer already stops there; HF-style decodes render it as `<eos>` / `</s>`."""
  text = text or ""
  for m in _END_MARKERS:
    text = text.split(m, 1)[0]
  return text


def _lex(text: str) -> list[tuple[str, Any, int, int]]:
  """text -> [(kind, value, start, end)], kind in loc | seg | sep | text; whitespace-only text is dropped.

  `text[start:end]` is the item's source, so a run of items quotes the model output verbatim."""
  out, pos = [], 0

  def add_text(a: int, b: int) -> None:
    if text[a:b].strip():
      out.append(("text", text[a:b].strip(), a, b))

  for m in _TOKEN_RE.finditer(text):
    add_text(pos, m.start())
    if m.group(1) is not None:
      out.append(("loc", int(m.group(1)), m.start(), m.end()))
    elif m.group(2) is not None:
      out.append(("seg", int(m.group(2)), m.start(), m.end()))
    else:
      out.append(("sep", None, m.start(), m.end()))
    pos = m.end()
  add_text(pos, len(text))
  return out


def _match_label(label: str, classes: Sequence[str]) -> Optional[str]:
  label = " ".join(label.split())
  if label in classes:
    return label
  folded = {c.casefold(): c for c in classes}
  return folded.get(label.casefold())


def parse_objects(text: str, classes: Sequence[str], segment: bool = False,
                  truncated: bool = False) -> tuple[list[dict], list[dict]]:
  """`<loc>x4 [<seg>x16] label ; …` -> (objects with fractional boxes and `codes`, parse errors).

  An object is a run of loc tokens, then seg tokens, then label text, ended by `;`, the next loc/seg token
  or the end. Objects with a bad box or label are dropped; a segment object with unusable seg tokens is kept
  with `codes` None. Anything outside an object (stray text or tokens) is recorded and skipped.
  """
  text = clean_text(text)
  items = _lex(text)
  source = lambda a, b: text[items[a][2]:items[b - 1][3]].strip()  # verbatim text of items[a:b]
  objects, errors = [], []
  i, n = 0, len(items)
  while i < n:
    kind = items[i][0]
    if kind == "sep":
      i += 1
      continue
    if kind != "loc":  # stray text or seg token outside an object: take the whole run up to the next loc/;
      j = i
      while j < n and items[j][0] in ("text", "seg"):
        j += 1
      part = source(i, j)
      errors.append({"part": part, "reason": "text outside an object" if kind == "text"
                     else "segmentation tokens without a box"})
      i = j
      continue
    j = i
    while j < n and items[j][0] == "loc":
      j += 1
    locs = [it[1] for it in items[i:j]]
    k = j
    while k < n and items[k][0] == "seg":
      k += 1
    segs = [it[1] for it in items[j:k]]
    label = items[k][1] if k < n and items[k][0] == "text" else None
    end = k + 1 if label is not None else k
    part = source(i, end)
    last = end >= n or all(it[0] == "sep" for it in items[end:])
    cut = " (output truncated)" if truncated and last else ""
    i = end
    if len(locs) != LOCS_PER_BOX:
      errors.append({"part": part, "reason": f"expected {LOCS_PER_BOX} location tokens, got {len(locs)}{cut}"})
      continue
    ymin, xmin, ymax, xmax = locs
    if max(locs) >= NUM_LOC:
      errors.append({"part": part, "reason": f"location value above {NUM_LOC - 1}"})
      continue
    if ymax <= ymin or xmax <= xmin:
      errors.append({"part": part, "reason": "empty or inverted box (needs ymax > ymin and xmax > xmin)"})
      continue
    if label is None:
      errors.append({"part": part, "reason": f"missing label{cut}"})
      continue
    matched = _match_label(label, classes)
    if matched is None:
      errors.append({"part": part, "reason": f"label {label!r} is not one of the task's classes"})
      continue
    obj = {"label": matched, "ymin": ymin / NUM_LOC, "xmin": xmin / NUM_LOC,
           "ymax": ymax / NUM_LOC, "xmax": xmax / NUM_LOC}
    if segment:
      codes = None
      if len(segs) != SEGS_PER_MASK:
        errors.append({"part": part, "reason": f"expected {SEGS_PER_MASK} segmentation tokens, got {len(segs)}; "
                       "box kept without mask"})
      elif max(segs) >= NUM_SEG:
        errors.append({"part": part, "reason": f"segmentation code above {NUM_SEG - 1}; box kept without mask"})
      else:
        codes = segs
      obj["codes"] = codes
    elif segs:
      errors.append({"part": part, "reason": "unexpected segmentation tokens in detect output; ignored"})
    objects.append(obj)
  return objects, errors


def to_pixels(obj: dict, width: int, height: int) -> dict:
  """Adds `{y,x}{min,max}_px` = round(fraction * size) (halves round up) in original-image pixels."""
  out = dict(obj)
  for k, size in (("ymin", height), ("xmin", width), ("ymax", height), ("xmax", width)):
    out[f"{k}_px"] = int(np.floor(obj[k] * size + 0.5))
  return out


def tasks_of(schema: pa.Schema) -> list[Task]:
  """The tasks recorded in an output schema's metadata (e.g. `pq.read_schema(path)`)."""
  return [make_task(d) for d in json.loads((schema.metadata or {})[META_TASKS])]
