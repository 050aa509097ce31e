"""Batch entry points for the pipeline: PreFilter (image bytes, before annotation) and PostFilter (task text).

Both are thin: they hold lazily loaded filters (so a Ray actor loads each model once) and call the pure
functions `score_batch`, `apply_policy`/`decide_row`. A filter that raises is retried row by row; rows that
still fail become error rows (stage "safety") with their task columns nulled: nothing unfiltered is published.
"""
from __future__ import annotations

import json
import logging
from typing import Any, Callable

import numpy as np
import pyarrow as pa

from pgbatch import rows, schema
from pgbatch.safety.base import Finding, Hit, hits_to_findings
from pgbatch.safety.decide import apply_policy, decide_row, finding_record, max_scores, rule_findings
from pgbatch.safety.policy import IMAGE_FILTERS, TEXT_FILTERS, SafetyPolicy
from pgbatch.safety.registry import filter_info, load_filter

log = logging.getLogger(__name__)
PRE_COLUMN = "safety_pre"
INTERNAL_COLUMNS = {PRE_COLUMN, "image_bytes", "pixels"}


def score_batch(score: Callable[[list], list[list[Hit]]], items: list) -> tuple[list[list[Hit] | None], list]:
  """Run `score` on the batch, isolating the items it raises on (`rows.isolate`). Returns (hits or None,
  exceptions or None), one of each per item."""
  done, failed = rows.isolate(lambda idx: score([items[i] for i in idx]), range(len(items)))
  return [done.get(i) for i in range(len(items))], [failed.get(i) for i in range(len(items))]


def error_info(name: str, exc: BaseException) -> dict:
  """Error struct for a failed filter. The exception text may quote the input (PII), so it is neither stored nor
  logged at WARNING; DEBUG logging shows it."""
  log.warning("safety filter %s raised %s; row withheld", name, type(exc).__name__)
  log.debug("safety filter %s failure", name, exc_info=exc)
  return rows.error("safety", exc, f"safety filter '{name}' raised; row withheld")


class _Filters:
  """Lazily loaded filters of one policy."""

  def __init__(self, policy: SafetyPolicy, names: tuple[str, ...]):
    self.policy = policy if isinstance(policy, SafetyPolicy) else SafetyPolicy.model_validate(policy)
    self.names = self.policy.enabled(names)
    self._loaded: dict[str, Any] = {}

  def get(self, name: str):
    if name not in self._loaded:
      self._loaded[name] = load_filter(name, self.policy)
    return self._loaded[name]

  def score(self, name: str, items: list) -> tuple[list, list]:
    """score_batch with load failures counted as failures of every item."""
    try:
      f = self.get(name)
    except Exception as e:  # noqa: BLE001
      return [None] * len(items), [e] * len(items)
    return score_batch(f.score, items)


def encode_pre(findings: list[Finding], error: dict | None) -> str:
  return json.dumps({"findings": [list(f) for f in findings], "error": error}, separators=(",", ":"))


def decode_pre(s: str | None) -> tuple[list[Finding], dict | None]:
  if not s:
    return [], None
  d = json.loads(s)
  return [Finding(*f) for f in d["findings"]], d["error"]


class PreFilter(_Filters):
  """Image stage, before annotation. Input: numpy batch dict with `image_bytes` (bytes or None), `status`, `key`.

  Scores the raw bytes (the NSFW filter decodes its own reduced copy; decoded pixels are not needed).
  Adds `safety_pre` (JSON string per row: image findings and any filter error) and marks drop_content rows
  'filtered' and rows whose filter failed 'error' (`error` set), so annotation skips both.
  """

  def __init__(self, policy: SafetyPolicy | dict | None = None):
    super().__init__(policy, IMAGE_FILTERS)

  def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    n = len(batch["status"])
    status = np.asarray(batch["status"], dtype=object).copy()
    data = batch["image_bytes"]
    findings: list[list[Finding]] = [[] for _ in range(n)]
    errors: list[dict | None] = [None] * n
    live = [i for i in range(n) if status[i] == "ok" and data[i] is not None]
    for name in self.names:  # hashlist before nsfw: a known-bad image never reaches the model
      hits, errs = self.score(name, [bytes(data[i]) for i in live])
      for i, h, e in zip(live, hits, errs):
        if e is not None:
          errors[i] = error_info(name, e)
        else:
          findings[i] += hits_to_findings(name, "image", h)
      live = [i for i in live if errors[i] is None and apply_policy(findings[i], self.policy).decision != "filtered"]
    row_errors = list(batch["error"]) if "error" in batch else [None] * n
    for i in range(n):
      if errors[i] is not None:
        rows.mark_error(status, row_errors, i, errors[i])
      elif apply_policy(findings[i], self.policy).decision == "filtered":
        rows.mark_filtered(status, i)
    out = dict(batch)
    out["status"] = status
    if "error" in batch or any(e is not None for e in row_errors):
      out["error"] = rows.as_object(row_errors)
    out[PRE_COLUMN] = np.array([encode_pre(f, e) for f, e in zip(findings, errors)], dtype=object)
    return out


def withheld_record(findings: list[Finding], policy: SafetyPolicy, digest: str) -> dict:
  """`safety` of a row withheld for an error: decision filtered, the findings and scores that did come in."""
  ruled = rule_findings(findings, policy)
  return {"decision": "filtered", "findings": [finding_record(r, (None, None)) for r in ruled],
          "scores": max_scores(findings), "policy_digest": digest}


def _set(table: pa.Table, name: str, arr: pa.Array) -> pa.Table:
  field = schema.fixed_field(name) if name in schema.FIXED_NAMES else table.schema.field(name)
  i = table.schema.get_field_index(name)
  return table.set_column(i, field, arr) if i >= 0 else table.append_column(field, arr)


class PostFilter(_Filters):
  """Text stage, after annotation. Input: pyarrow Table (or dict of columns) with the task columns, `status`
  and (optionally) `safety_pre`. Output: task text redacted or nulled, `status`/`error` updated, `safety`
  filled (schema.SAFETY_TYPE), `safety_pre` dropped.

  text_fields: task columns of struct<text, ...> to score (caption / ocr / answer).
  task_fields: every task column to null on drop_content or error; default: all columns that are neither
  fixed output columns nor internal (safety_pre, image_bytes, pixels).
  """

  def __init__(self, policy: SafetyPolicy | dict | None = None, text_fields: list[str] = (),
               task_fields: list[str] | None = None):
    super().__init__(policy, TEXT_FILTERS)
    self.text_fields = list(text_fields)
    self.task_fields = None if task_fields is None else list(task_fields)
    if self.text_fields or self.task_fields is not None:
      self.policy.check_fields(self.text_fields)
    self.policy_digest = self.policy.digest()

  def provenance_filters(self) -> list[dict]:
    """provenance.safety_filters: every enabled filter, image and text (schema.SAFETY_FILTER_TYPE)."""
    return [filter_info(n, self.policy) for n in self.policy.enabled()]

  def _task_fields(self, table: pa.Table) -> list[str]:
    if self.task_fields is not None:
      return [c for c in self.task_fields if c in table.column_names]
    fixed = {f.name for f in schema.FIXED_FIELDS}
    return [c for c in table.column_names if c not in fixed and c not in INTERNAL_COLUMNS and not c.startswith("_")]

  def _score_texts(self, values: dict[str, list], n: int):
    """Findings and errors per row from every enabled text filter over the fields it applies to."""
    findings: list[list[Finding]] = [[] for _ in range(n)]
    errors: list[dict | None] = [None] * n
    for name in self.names:
      pol = self.policy.filter(name)
      items = [(i, c, v["text"]) for c, col in values.items() if pol.applies_to(c)
               for i, v in enumerate(col) if v is not None and isinstance(v.get("text"), str)]
      hits, errs = self.score(name, [t for _, _, t in items])
      for (i, c, _), h, e in zip(items, hits, errs):
        if e is not None:
          errors[i] = errors[i] or error_info(name, e)
        else:
          findings[i] += hits_to_findings(name, f"{c}.text", h)
    return findings, errors

  def __call__(self, table: pa.Table | dict) -> pa.Table:
    if not isinstance(table, pa.Table):
      table = pa.table(table)
    n = table.num_rows
    text_cols = [c for c in self.text_fields if c in table.column_names]
    values = {c: table.column(c).to_pylist() for c in text_cols}
    pre = [decode_pre(s) for s in (table.column(PRE_COLUMN).to_pylist() if PRE_COLUMN in table.column_names
                                   else [None] * n)]
    text_findings, text_errors = self._score_texts(values, n)
    status = table.column("status").to_pylist()
    errors = table.column("error").to_pylist() if "error" in table.column_names else [None] * n
    records, withheld = [], np.zeros(n, dtype=bool)
    for i in range(n):
      findings = pre[i][0] + text_findings[i]
      texts = {f"{c}.text": values[c][i]["text"] for c in text_cols
               if values[c][i] is not None and isinstance(values[c][i].get("text"), str)}
      err = pre[i][1] or text_errors[i]
      if err is None:
        try:
          decision, written, rec = decide_row(findings, self.policy, texts, self.policy_digest)
        except Exception as e:  # noqa: BLE001 - e.g. a span outside the text: withhold the row, not the batch
          err = error_info("policy", e)
        else:
          if decision == "filtered":
            status[i], withheld[i] = "filtered", True
          for key, text in written.items():
            values[key[:-len(".text")]][i]["text"] = text
      if err is not None:
        rec = withheld_record(findings, self.policy, self.policy_digest)
        status[i], errors[i], withheld[i] = "error", err, True
      records.append(rec)
    for c in text_cols:
      table = _set(table, c, pa.array(values[c], type=table.schema.field(c).type))
    for c in self._task_fields(table):
      table = _set(table, c, rows.withhold(table.column(c), withheld))
    table = _set(table, "status", pa.array(status, pa.string()))
    table = _set(table, "error", pa.array(errors, schema.ERROR_TYPE))
    table = _set(table, "safety", pa.array(records, schema.SAFETY_TYPE))
    return table.drop_columns([PRE_COLUMN]) if PRE_COLUMN in table.column_names else table
