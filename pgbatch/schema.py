"""The output contract: every Arrow type of an annotation table (one row per input image).

Fixed columns are defined here once; each task adds one column typed by its kind (`ARROW_TYPES`). Field docs
are stored in the Arrow field metadata (key b"doc") so they travel with the Parquet files. The published
description (JSON Schema, Markdown, `pgbatch schema`) is generated from these types by `schema_docs`.
"""
from __future__ import annotations

import json

import pyarrow as pa

SCHEMA_VERSION = "1"


def field(name: str, type_: pa.DataType, doc: str, nullable: bool = True) -> pa.Field:
  return pa.field(name, type_, nullable=nullable, metadata={b"doc": doc.encode()})


def list_of(type_: pa.DataType) -> pa.DataType:
  """`list<element: type_>`: Parquet's list item name, so a schema read back from a file equals the code's."""
  return pa.list_(pa.field("element", type_))


ERROR_TYPE = pa.struct([
    field("stage", pa.string(), "pipeline stage that failed: read | decode | annotate | parse | safety | write"),
    field("type", pa.string(), "short machine-readable error class, e.g. UnidentifiedImageError"),
    field("message", pa.string(), "human-readable reason"),
])

SAFETY_FILTER_TYPE = pa.struct([
    field("name", pa.string(), "filter name"),
    field("version", pa.string(), "filter package version"),
    field("model_sha256", pa.string(), "sha256 of the filter's model file, null when it has none"),
])

PROVENANCE_TYPE = pa.struct([
    field("model_variant", pa.string(), "PaliGemma variant, e.g. pg2-3b-224"),
    field("checkpoint_uri", pa.string(), "where the weights were read from"),
    field("checkpoint_digest", pa.string(), "content digest of the checkpoint"),
    field("tokenizer_digest", pa.string(), "sha256 of the sentencepiece model"),
    field("pgbatch_version", pa.string(), "pgbatch package version"),
    field("job_id", pa.string(), "job name plus run id"),
    field("started_at", pa.timestamp("us", tz="UTC"), "when the job run started"),
    field("safety_filters", list_of(SAFETY_FILTER_TYPE), "safety filters applied to this row"),
])

FINDING_TYPE = pa.struct([
    field("filter", pa.string(), "filter name"),
    field("category", pa.string(), "e.g. toxicity, EMAIL_ADDRESS, CREDIT_CARD, nsfw, known_bad_hash"),
    field("field", pa.string(), "column path scored, e.g. caption_en.text, or image"),
    field("score", pa.float32(), "score in [0, 1]"),
    field("threshold", pa.float32(), "policy threshold the score met"),
    field("action", pa.string(), "flag | redact | drop_content"),
    field("start", pa.int32(), "span start (character offset into the written text), null if none"),
    field("end", pa.int32(), "span end (exclusive), null if none"),
])

SCORE_TYPE = pa.struct([
    field("filter", pa.string(), "filter name"),
    field("category", pa.string(), "category"),
    field("field", pa.string(), "column path scored"),
    field("score", pa.float32(), "maximum score over the field"),
])

SAFETY_TYPE = pa.struct([
    field("decision", pa.string(), "pass | flagged | redacted | filtered"),
    field("findings", list_of(FINDING_TYPE), "findings at or above their threshold"),
    field("scores", list_of(SCORE_TYPE), "max score per filter/category/field, for re-thresholding"),
    field("policy_digest", pa.string(), "sha256 of the resolved safety policy"),
])

FIXED_FIELDS = [
    field("key", pa.string(), "sample key within its shard (WebDataset key, Parquet key column or row number, "
          "image file name)", False),
    field("source_uri", pa.string(), "URI of the image (shard URI plus member for archives)"),
    field("shard", pa.string(), "URI of the input shard", False),
    field("sha256", pa.string(), "sha256 of the image bytes as read"),
    field("width", pa.int32(), "original image width in pixels (after EXIF orientation)"),
    field("height", pa.int32(), "original image height in pixels (after EXIF orientation)"),
    field("metadata", pa.string(), "JSON object passed through from the input: WebDataset sidecars by extension "
          "(.json parsed, .txt/.cls as text), the other columns of a Parquet input; '{}' when none"),
    field("status", pa.string(), "ok | error | filtered", False),
    field("error", ERROR_TYPE, "why the row has status error; null otherwise"),
    field("provenance", PROVENANCE_TYPE, "what produced this row"),
    field("safety", SAFETY_TYPE, "safety filter decision for this row"),
]

FIXED_NAMES = tuple(f.name for f in FIXED_FIELDS)


def fixed_field(name: str) -> pa.Field:
  """The fixed output column `name` (KeyError naming it when there is none)."""
  for f in FIXED_FIELDS:
    if f.name == name:
      return f
  raise KeyError(f"{name!r} is not a fixed output column (those are {', '.join(FIXED_NAMES)})")


SCHEMA_NAME = f"annotations.v{SCHEMA_VERSION}"
META_VERSION = b"pgbatch.schema_version"
META_TASKS = b"pgbatch.tasks"

# Task columns: one type per task kind.

TEXT_TYPE = pa.struct([
    field("text", pa.string(), "model output up to EOS, surrounding whitespace stripped", False),
    field("prompt", pa.string(), "prompt text sent with the image (without BOS and the trailing newline)"),
    field("num_tokens", pa.int32(), "tokens generated, EOS included when emitted", False),
    field("truncated", pa.bool_(), "decoding hit max_new_tokens before EOS", False),
])

PARSE_ERROR_TYPE = pa.struct([
    field("part", pa.string(), "the piece of model text that was not understood", False),
    field("reason", pa.string(), "why it was rejected", False),
])

_BOX_FIELDS = [
    field("label", pa.string(), "class, one of the task's classes (the job's spelling)", False),
    field("ymin", pa.float32(), "top edge, fraction of the original image height (loc / 1024)", False),
    field("xmin", pa.float32(), "left edge, fraction of the original image width (loc / 1024)", False),
    field("ymax", pa.float32(), "bottom edge, fraction of the original image height (loc / 1024)", False),
    field("xmax", pa.float32(), "right edge, fraction of the original image width (loc / 1024)", False),
    field("ymin_px", pa.int32(), "top edge in original pixels, round(ymin * height)", False),
    field("xmin_px", pa.int32(), "left edge in original pixels, round(xmin * width)", False),
    field("ymax_px", pa.int32(), "bottom edge in original pixels (exclusive), round(ymax * height)", False),
    field("xmax_px", pa.int32(), "right edge in original pixels (exclusive), round(xmax * width)", False),
]

MASK_TYPE = pa.struct([
    field("height", pa.int32(), "mask height = original image height", False),
    field("width", pa.int32(), "mask width = original image width", False),
    field("rle", list_of(pa.int32()), "COCO uncompressed RLE counts, column-major, starting with zeros", False),
])

DETECTION_TYPE = pa.struct(_BOX_FIELDS)
SEGMENTATION_TYPE = pa.struct(_BOX_FIELDS + [
    field("mask", MASK_TYPE, "instance mask over the whole image; null when the seg tokens were unusable"),
])


def _located_type(object_type: pa.DataType, what: str) -> pa.DataType:
  return pa.struct([
      field("objects", list_of(object_type), f"{what} that parsed, in output order (labels may repeat)", False),
      field("raw", pa.string(), "model output up to EOS, verbatim", False),
      field("prompt", pa.string(), "prompt text sent with the image"),
      field("num_tokens", pa.int32(), "tokens generated, EOS included when emitted", False),
      field("truncated", pa.bool_(), "decoding hit max_new_tokens before EOS", False),
      field("parse_errors", list_of(PARSE_ERROR_TYPE), "parts of `raw` that were dropped or incomplete", False),
  ])


DETECT_TYPE = _located_type(DETECTION_TYPE, "boxes")
SEGMENT_TYPE = _located_type(SEGMENTATION_TYPE, "instances")
ARROW_TYPES = {"caption": TEXT_TYPE, "ocr": TEXT_TYPE, "answer": TEXT_TYPE,
               "detect": DETECT_TYPE, "segment": SEGMENT_TYPE}


def output_schema(tasks) -> pa.Schema:
  """FIXED_FIELDS + one column per task (named task.name, typed by its kind), with version and task list
  in the schema metadata. `tasks`: `pgbatch.tasks.Task`s (anything with name, arrow_type, doc, spec())."""
  names = list(FIXED_NAMES)
  for t in tasks:
    if t.name in names:
      what = "a fixed output column" if t.name in FIXED_NAMES else "another task"
      raise ValueError(f"tasks[{t.name}].name: clashes with {what} of that name")
    names.append(t.name)
  cols = [field(t.name, t.arrow_type, t.doc) for t in tasks]
  meta = {META_VERSION: SCHEMA_VERSION.encode(),
          META_TASKS: json.dumps([t.spec() for t in tasks], sort_keys=True).encode()}
  return pa.schema(FIXED_FIELDS + cols, metadata=meta)
