"""The output contract: the Arrow schema of an annotation table (one row per input image).

Fixed columns are defined here once; each task adds one typed column (its type comes from `pgbatch.tasks`).
Field docs are stored in the Arrow field metadata (key b"doc") so they travel with the Parquet files.
"""
from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = "1"


def field(name: str, type_: pa.DataType, doc: str, nullable: bool = True) -> pa.Field:
  return pa.field(name, type_, nullable=nullable, metadata={b"doc": doc.encode()})


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
    field("safety_filters", pa.list_(SAFETY_FILTER_TYPE), "safety filters applied to this row"),
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
    field("findings", pa.list_(FINDING_TYPE), "findings at or above their threshold"),
    field("scores", pa.list_(SCORE_TYPE), "max score per filter/category/field, for re-thresholding"),
    field("policy_digest", pa.string(), "sha256 of the resolved safety policy"),
])

FIXED_FIELDS = [
    field("key", pa.string(), "sample key within its shard (WebDataset key, Parquet key column or file stem)", False),
    field("source_uri", pa.string(), "URI of the image (shard URI plus member for archives)"),
    field("shard", pa.string(), "URI of the input shard", False),
    field("sha256", pa.string(), "sha256 of the image bytes as read"),
    field("width", pa.int32(), "original image width in pixels (after EXIF orientation)"),
    field("height", pa.int32(), "original image height in pixels (after EXIF orientation)"),
    field("status", pa.string(), "ok | error | filtered", False),
    field("error", ERROR_TYPE, "why the row has status error; null otherwise"),
    field("provenance", PROVENANCE_TYPE, "what produced this row"),
    field("safety", SAFETY_TYPE, "safety filter decision for this row"),
]
