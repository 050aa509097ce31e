"""The published description of the output contract, generated from `pgbatch.schema`: JSON Schema,
Markdown (`schemas/annotations.v*.{json,md}`, drift-checked by a test) and an indented tree (`pgbatch schema`)."""
from __future__ import annotations

import json
import os

import pyarrow as pa

from pgbatch import tasks as tasks_lib
from pgbatch.schema import ARROW_TYPES, FIXED_FIELDS, FIXED_NAMES, SCHEMA_NAME, SCHEMA_VERSION, output_schema


# One task of each kind: the job the published files under schemas/ describe.
CANONICAL_TASKS = (
    {"name": "caption_en", "kind": "caption", "lang": "en"},
    {"name": "ocr", "kind": "ocr"},
    {"name": "vqa", "kind": "answer", "lang": "en", "question_field": "question"},
    {"name": "detections", "kind": "detect", "classes": ["car", "person", "dog"]},
    {"name": "segments", "kind": "segment", "classes": ["cat", "dog"]},
)


def canonical_tasks() -> list[tasks_lib.Task]:
  return [tasks_lib.make_task(d) for d in CANONICAL_TASKS]


def _doc(f: pa.Field) -> str:
  return (f.metadata or {}).get(b"doc", b"").decode()


# ---------------------------------------------------------------------------------------------------------
# JSON Schema

def json_type(t: pa.DataType) -> dict:
  """Arrow type -> JSON Schema of a non-null value (as `Table.to_pylist()` / JSON writers emit it)."""
  if pa.types.is_string(t) or pa.types.is_large_string(t):
    return {"type": "string"}
  if pa.types.is_boolean(t):
    return {"type": "boolean"}
  if pa.types.is_integer(t):
    info = {8: 127, 16: 32767, 32: 2**31 - 1, 64: 2**63 - 1}[t.bit_width]
    return {"type": "integer", "minimum": -info - 1, "maximum": info}
  if pa.types.is_floating(t):
    return {"type": "number"}
  if pa.types.is_timestamp(t):
    return {"type": "string", "format": "date-time"}
  if pa.types.is_list(t) or pa.types.is_large_list(t):
    return {"type": "array", "items": json_field(t.value_field)}
  if pa.types.is_struct(t):
    return {"type": "object", "properties": {f.name: json_field(f) for f in t},
            "required": [f.name for f in t], "additionalProperties": False}
  raise TypeError(f"no JSON Schema mapping for {t}")


def _nullable(schema: dict) -> dict:
  if "$ref" in schema:
    return {"anyOf": [schema, {"type": "null"}]}
  return {**schema, "type": [schema["type"], "null"]}


def json_field(f: pa.Field) -> dict:
  out = json_type(f.type)
  out = _nullable(out) if f.nullable else out
  return {"description": _doc(f), **out} if _doc(f) else out


KIND_DEFS = {"caption": "text_result", "ocr": "text_result", "answer": "text_result",
             "detect": "detect_result", "segment": "segment_result"}


def json_schema(tasks=None) -> dict:
  """JSON Schema of one output row. Task columns are `$ref`s to one `$defs` entry per result type; columns
  of other jobs (any other property) must match one of them."""
  tasks = canonical_tasks() if tasks is None else tasks
  defs = {KIND_DEFS[k]: json_type(ARROW_TYPES[k]) for k in tasks_lib.KINDS}
  defs["text_result"]["description"] = "result of caption, ocr and answer tasks"
  defs["detect_result"]["description"] = "result of detect tasks"
  defs["segment_result"]["description"] = "result of segment tasks"
  props = {f.name: json_field(f) for f in FIXED_FIELDS}
  for t in tasks:
    props[t.name] = {"description": t.doc, **_nullable({"$ref": f"#/$defs/{KIND_DEFS[t.kind]}"})}
  any_task = {"anyOf": [{"$ref": f"#/$defs/{d}"} for d in sorted(set(KIND_DEFS.values()))] + [{"type": "null"}]}
  return {
      "$schema": "https://json-schema.org/draft/2020-12/schema",
      "$id": f"{SCHEMA_NAME}.json",
      "title": f"pgbatch annotation row, schema version {SCHEMA_VERSION}",
      "description": (
          "One row per input image. The fixed columns are always present. Every task of the job adds one "
          "column named by the job spec (tasks[].name) and typed by its kind: caption, ocr and answer -> "
          "$defs/text_result, detect -> $defs/detect_result, segment -> $defs/segment_result. The properties "
          "below show the canonical job (x-pgbatch.tasks); any other property is a task column of another "
          f"job and must match one of the result types. See {SCHEMA_NAME}.md for conventions."),
      "type": "object",
      "properties": props,
      "required": list(FIXED_NAMES),
      "additionalProperties": any_task,
      "$defs": defs,
      "x-pgbatch": {"schema_version": SCHEMA_VERSION, "tasks": [t.spec() for t in tasks],
                    "kinds": {k: f"#/$defs/{v}" for k, v in KIND_DEFS.items()}},
  }


# ---------------------------------------------------------------------------------------------------------
# Human-readable description

# (title, language, code); "out/*.parquet" is the job's output URI. tests/test_schema.py runs every one.
EXAMPLE_QUERIES = (
    ("Detections per label (DuckDB)", "sql", """\
SELECT o.label, count(*) AS n
FROM (SELECT unnest(detections.objects) AS o
      FROM read_parquet('out/*.parquet') WHERE status = 'ok')
GROUP BY o.label ORDER BY n DESC, o.label"""),
    ("Mean caption length in characters (DuckDB)", "sql", """\
SELECT avg(length(caption_en.text)) AS mean_chars, avg(caption_en.num_tokens) AS mean_tokens
FROM read_parquet('out/*.parquet') WHERE status = 'ok'"""),
    ("Rows by status and error stage (DuckDB)", "sql", """\
SELECT status, error.stage AS stage, error.type AS type, count(*) AS n
FROM read_parquet('out/*.parquet') GROUP BY ALL ORDER BY n DESC, status, stage"""),
    ("Outputs the parser could not fully read (DuckDB)", "sql", """\
SELECT key, e.part, e.reason
FROM (SELECT key, unnest(detections.parse_errors) AS e FROM read_parquet('out/*.parquet'))
ORDER BY key, e.part"""),
    ("Detections per label (Polars)", "python", """\
import polars as pl
df = pl.read_parquet("out/*.parquet")
result = (df.filter(pl.col("status") == "ok")
          .select(pl.col("detections").struct.field("objects")).explode("objects")
          .drop_nulls().unnest("objects").group_by("label").len().sort("label"))"""),
    ("Mean caption length (Polars)", "python", """\
import polars as pl
df = pl.read_parquet("out/*.parquet")
result = df.filter(pl.col("status") == "ok").select(
    pl.col("caption_en").struct.field("text").str.len_chars().mean().alias("mean_chars"))"""),
    ("Segment masks as COCO RLE (pycocotools)", "python", """\
import glob
import pyarrow.parquet as pq
from pycocotools import mask as mask_utils
result = {}  # key -> [(label, mask area in pixels)]
for path in sorted(glob.glob("out/*.parquet")):
  for row in pq.read_table(path, columns=["key", "segments"]).to_pylist():
    for obj in (row["segments"] or {}).get("objects", []):
      m = obj["mask"]
      if m is not None:  # null when the seg tokens were unusable
        rle = mask_utils.frPyObjects({"size": [m["height"], m["width"]], "counts": m["rle"]},
                                     m["height"], m["width"])
        binary = mask_utils.decode(rle)  # uint8 [height, width]
        result.setdefault(row["key"], []).append((obj["label"], int(mask_utils.area(rle))))"""),
)

_PROSE_HEAD = """\
One row per input image, whatever happened to it: every image read from the job's input shards appears
exactly once, in one Parquet file per input shard. Field descriptions are also stored in the Parquet files
(Arrow field metadata, key `doc`); the schema metadata holds `pgbatch.schema_version` and `pgbatch.tasks`
(the job's resolved task list as JSON).

## Status

| status | meaning |
|---|---|
| `ok` | the image was decoded and annotated; every task column holds a result |
| `error` | something failed; `error.stage` (read, decode, annotate, parse, safety, write), `error.type` and `error.message` say what. Task columns are null, except results already produced before the failure |
| `filtered` | the safety policy removed the content of this row (`safety.decision` = `filtered`); task columns are null |

`error` is null unless `status` is `error`. A model output that parses only partly is *not* an error: the row
stays `ok` and the unparsed parts are listed in the task's `parse_errors`.
"""

_PROSE_TASKS = """\
## Task columns

Each task in the job spec adds one column, **named by the job** (`tasks[].name`) and typed by its kind.
The JSON Schema (`{name}.json`) gives one `$defs` entry per result type (`text_result`, `detect_result`,
`segment_result`) and describes the canonical job below; any other job's columns match the same
definitions.

| kind | prompt | default max_new_tokens | result type |
|---|---|---|---|
| `caption` | `caption {{lang}}` | 64 | text |
| `ocr` | `ocr` | 128 | text |
| `answer` | `answer {{lang}} {{question}}` (question fixed, or per image from the metadata field `question_field`) | 32 | text |
| `detect` | `detect {{a}} ; {{b}}` | 16 + 32 per class | detect |
| `segment` | `segment {{a}} ; {{b}}` | 16 + 48 per class | segment |

Canonical job (the columns below): {canonical}.
"""

_PROSE_CONVENTIONS = """\
## Conventions

**Boxes.** The model writes a box as `<locYMIN><locXMIN><locYMAX><locXMAX>`, each value v in 0..1023 a bin of
its square input. pgbatch decodes v as the box edge **v / 1024** (as the PaliGemma demo does; big_vision
encodes training boxes with round(x * 1023), a difference below 0.1%). So `ymin`..`xmax` lie in
[0, 1023/1024], as fractions of the *original* image (the model input is a plain squash, no padding).
Pixel edges are `round(fraction * height)` / `round(fraction * width)`, halves rounded up; `ymax_px` and
`xmax_px` are exclusive. A box needs ymax > ymin and xmax > xmin, otherwise it is dropped and recorded.

**Labels.** Must be one of the task's classes (matched exactly, then case-insensitively; the job's
spelling is stored). Repeated labels are normal (several instances). Unknown labels are dropped and recorded.

**Masks.** `mask` covers the whole original image (`height` x `width` = the row's `height` x `width`). `rle`
is COCO *uncompressed* RLE: run lengths over the column-major (Fortran-order) flattening of the mask,
alternating 0 and 1 and starting with a (possibly empty) run of 0. `{"size": [height, width], "counts":
rle}` goes through `pycocotools.mask.frPyObjects`. The 16 `<segNNN>` tokens are decoded by the VQ-VAE
(model.vae) to 64x64 logits, resized with PIL bilinear to the pixel box and thresholded at > 0 (the
big_vision evaluator's rule). When the seg tokens are missing, short or out of range the box is kept,
`mask` is null and a parse error is recorded.

**Parse errors.** `raw` is the model text up to EOS, verbatim. Parsers never fail on model output: every
part of `raw` that was not turned into an object (stray text, wrong number of location tokens, inverted
boxes, unknown labels, unusable seg tokens) is listed in `parse_errors` as `{part, reason}`; a reason ends
with "(output truncated)" when the part was cut by `max_new_tokens`.

**Tokens.** `num_tokens` counts the generated tokens, EOS included when emitted; `truncated` is true when
decoding stopped at `max_new_tokens` before EOS.
"""


def _type_name(t: pa.DataType) -> str:
  if pa.types.is_struct(t):
    return "struct"
  if pa.types.is_list(t):
    return f"list<{_type_name(t.value_type)}>"
  return {"float": "float32", "double": "float64", "halffloat": "float16"}.get(str(t), str(t))


def _rows(f: pa.Field, prefix: str = "") -> list[str]:
  """Markdown table rows for a field and its nested fields, paths like `detections.objects[].label`."""
  path = f"{prefix}{f.name}"
  doc = _doc(f).replace("|", "\\|")
  out = [f"| `{path}` | {_type_name(f.type)} | {'yes' if f.nullable else 'no'} | {doc} |"]
  t = f.type
  while pa.types.is_list(t):
    path, t = path + "[]", t.value_type
  if pa.types.is_struct(t):
    for child in t:
      out += _rows(child, path + ".")
  return out


_TABLE_HEAD = "| column | type | nullable | description |\n|---|---|---|---|"


def markdown(tasks=None) -> str:
  tasks = canonical_tasks() if tasks is None else tasks
  schema = output_schema(tasks)
  canonical = ", ".join(f"`{t.name}` ({t.kind}, prompt `{t.prompt({'question': '…'})}`)" for t in tasks)
  parts = [f"# pgbatch output contract, schema version {SCHEMA_VERSION}\n",
           "<!-- generated by `pgbatch schema export`; do not edit -->\n", _PROSE_HEAD,
           "## Fixed columns\n", _TABLE_HEAD]
  for f in FIXED_FIELDS:
    parts += _rows(f)
  parts += ["", _PROSE_TASKS.format(name=SCHEMA_NAME, canonical=canonical), _TABLE_HEAD]
  for f in schema:
    if f.name not in FIXED_NAMES:
      parts += _rows(f)
  parts += ["", _PROSE_CONVENTIONS, "## Example queries\n",
            "`out/*.parquet` stands for the job's output location (`output.uri`).\n"]
  for title, lang, code in EXAMPLE_QUERIES:
    parts += [f"**{title}**\n", f"```{lang}\n{code}\n```\n"]
  return "\n".join(parts).rstrip() + "\n"


def export(out_dir: str = "schemas") -> list[str]:
  """Writes `annotations.v{N}.json` and `.md` (canonical job) into `out_dir`; returns the paths."""
  os.makedirs(out_dir, exist_ok=True)
  paths = [os.path.join(out_dir, f"{SCHEMA_NAME}.json"), os.path.join(out_dir, f"{SCHEMA_NAME}.md")]
  with open(paths[0], "w") as f:
    f.write(json.dumps(json_schema(), indent=2, ensure_ascii=False) + "\n")
  with open(paths[1], "w") as f:
    f.write(markdown())
  return paths


def describe(schema: pa.Schema) -> str:
  """Indented tree of an Arrow schema with each field's doc."""
  lines = []

  def walk(f: pa.Field, depth: int):
    lines.append(f"{'  ' * depth}{f.name}: {_type_name(f.type)}{'' if f.nullable else ' not null'}"
                 f"{'  # ' + _doc(f) if _doc(f) else ''}")
    t = f.type
    while pa.types.is_list(t):
      t = t.value_type
    if pa.types.is_struct(t):
      for c in t:
        walk(c, depth + 1)

  for f in schema:
    walk(f, 0)
  for k, v in (schema.metadata or {}).items():
    lines.append(f"# {k.decode()}: {v.decode()}")
  return "\n".join(lines)
