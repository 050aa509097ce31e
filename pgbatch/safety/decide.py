"""Pure policy logic: findings -> decision, redaction of spans, the row's `safety` record."""
from __future__ import annotations

import bisect
import functools
from typing import NamedTuple

from pgbatch.safety.base import Finding
from pgbatch.safety.policy import PRECEDENCE, SafetyPolicy

DECISION = {0: "pass", 1: "flagged", 2: "redacted", 3: "filtered"}


class Ruled(NamedTuple):
  """A finding at or above its threshold, with the action the policy gives it."""
  finding: Finding
  threshold: float
  action: str


class Decision(NamedTuple):
  decision: str                                   # pass | flagged | redacted | filtered
  ruled: list[Ruled]                              # findings at/above threshold
  redactions: dict[str, list[tuple[int, int, str]]]  # field -> (start, end, category) to replace


def rule_findings(findings: list[Finding], policy: SafetyPolicy) -> list[Ruled]:
  """Keep findings with score >= threshold, each with its (threshold, action)."""
  out = []
  for f in findings:
    t, a = policy.filter(f.filter).rule(f.category)
    if f.score >= t:
      out.append(Ruled(f, t, a))
  return out


def apply_policy(findings: list[Finding], policy: SafetyPolicy, texts: dict[str, str] | None = None) -> Decision:
  """Decision for one row (drop_content > redact > flag) and the spans to redact per field.

  A redact finding without a span (e.g. toxicity) redacts its whole field; `texts` gives field lengths.
  """
  ruled = rule_findings(findings, policy)
  level = max((PRECEDENCE[r.action] for r in ruled), default=0)
  redactions: dict[str, list[tuple[int, int, str]]] = {}
  if level == PRECEDENCE["redact"]:
    for r in ruled:
      if r.action == "redact":
        f = r.finding
        start, end = (f.start, f.end) if f.start is not None else (0, len((texts or {}).get(f.field) or ""))
        redactions.setdefault(f.field, []).append((start, end, f.category))
  return Decision(DECISION[level], ruled, redactions)


def merge_spans(spans: list[tuple[int, int, str]]) -> list[tuple[int, int, str]]:
  """Union overlapping/touching-inside spans; the merged span keeps the category of its longest member."""
  out: list[list] = []
  for s, e, c in sorted(spans, key=lambda x: (x[0], -x[1])):
    if out and s < out[-1][1]:
      if e - s > out[-1][3]:
        out[-1][2], out[-1][3] = c, e - s
      out[-1][1] = max(out[-1][1], e)
    else:
      out.append([s, e, c, e - s])
  return [(s, e, c) for s, e, c, _ in out]


def placeholder(category: str) -> str:
  return f"[{category.upper()}]"


@functools.lru_cache(maxsize=1)
def _anonymizer():
  from presidio_anonymizer import AnonymizerEngine
  return AnonymizerEngine()


def redact_text(text: str, spans: list[tuple[int, int, str]]) -> tuple[str, list[tuple[int, int]], list[tuple[int, int]]]:
  """Replace spans with `[CATEGORY]` (presidio-anonymizer); returns (text, old merged spans, new spans)."""
  from presidio_anonymizer.entities import OperatorConfig, RecognizerResult
  merged = merge_spans(spans)
  if not merged:
    return text, [], []
  results = [RecognizerResult(c, s, e, 1.0) for s, e, c in merged]
  ops = {c: OperatorConfig("replace", {"new_value": placeholder(c)}) for _, _, c in merged}
  res = _anonymizer().anonymize(text, results, ops, merge_entities_with_spaces=False)
  new = sorted((i.start, i.end) for i in res.items)
  if len(new) != len(merged):
    raise RuntimeError("anonymizer merged spans unexpectedly")
  return res.text, [(s, e) for s, e, _ in merged], new


def map_offset(x: int, old: list[tuple[int, int]], new: list[tuple[int, int]], is_end: bool) -> int:
  """Offset in the original text -> offset in the redacted text (inside a redaction -> its placeholder edge)."""
  i = bisect.bisect_right([s for s, _ in old], x - 1 if is_end else x) - 1
  if i >= 0 and (old[i][0] < x <= old[i][1] if is_end else old[i][0] <= x < old[i][1]):
    return new[i][1] if is_end else new[i][0]
  if i < 0:
    return x
  return x + new[i][1] - old[i][1]


def map_span(start: int | None, end: int | None, old, new) -> tuple[int | None, int | None]:
  if start is None or not old:
    return start, end
  return map_offset(start, old, new, False), map_offset(end, old, new, True)


def max_scores(findings: list[Finding]) -> list[dict]:
  """Max score per (filter, category, field), in first-seen order."""
  best: dict[tuple[str, str, str], float] = {}
  for f in findings:
    k = (f.filter, f.category, f.field)
    best[k] = max(best.get(k, 0.0), f.score)
  return [{"filter": k[0], "category": k[1], "field": k[2], "score": v} for k, v in best.items()]


def finding_record(r: Ruled, span: tuple[int | None, int | None]) -> dict:
  f = r.finding
  return {"filter": f.filter, "category": f.category, "field": f.field, "score": f.score,
          "threshold": r.threshold, "action": r.action, "start": span[0], "end": span[1]}


def decide_row(findings: list[Finding], policy: SafetyPolicy, texts: dict[str, str],
               policy_digest: str) -> tuple[str, dict[str, str], dict]:
  """Full row decision: (decision, written texts per field, safety record). Texts are field -> text."""
  d = apply_policy(findings, policy, texts)
  written = dict(texts)
  maps: dict[str, tuple[list, list]] = {}
  for field, spans in d.redactions.items():
    written[field], old, new = redact_text(texts[field], spans)
    maps[field] = (old, new)
  records = []
  for r in d.ruled:
    f = r.finding
    if d.decision == "filtered" or f.start is None and not (r.action == "redact" and f.field in maps):
      span = (None, None)
    elif f.start is None:  # whole-field redaction
      span = (maps[f.field][1][0][0], maps[f.field][1][-1][1])
    else:
      span = map_span(f.start, f.end, *maps.get(f.field, ([], [])))
    records.append(finding_record(r, span))
  if d.decision == "filtered":
    written = {k: None for k in texts}
  record = {"decision": d.decision, "findings": records, "scores": max_scores(findings),
            "policy_digest": policy_digest}
  return d.decision, written, record
