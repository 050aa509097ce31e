"""Safety filters applied to every annotation, offline, with the decision recorded per row.

Filters are pure batch scorers (text: toxicity, wordlist, pii; image: hashlist, nsfw); the policy
(`SafetyPolicy`, defaults in defaults.yaml) turns their findings into flag | redact | drop_content.
"""
from pgbatch.safety.base import Finding, Hit
from pgbatch.safety.decide import Decision, apply_policy, decide_row, redact_text
from pgbatch.safety.policy import (CategoryPolicy, FilterPolicy, HashListPolicy, NsfwPolicy, PiiPolicy,
                                   SafetyPolicy, ToxicityPolicy, WordlistPolicy)
from pgbatch.safety.registry import filter_info, load_filter
from pgbatch.safety.stages import PRE_COLUMN, PostFilter, PreFilter, score_batch


def score_text(texts: list[str], policy: SafetyPolicy | None = None, field: str = "text",
               filters: dict | None = None) -> list[list[Finding]]:
  """Findings (all scores, any threshold) of every enabled text filter on each text; `filters` caches models."""
  policy = policy or SafetyPolicy.default()
  filters = {} if filters is None else filters
  out: list[list[Finding]] = [[] for _ in texts]
  for name in policy.enabled(("toxicity", "wordlist", "pii")):
    if name not in filters:
      filters[name] = load_filter(name, policy)
    for i, hits in enumerate(filters[name].score(list(texts))):
      out[i] += [Finding(name, h.category, field, h.score, h.start, h.end) for h in hits]
  return out


__all__ = ["CategoryPolicy", "Decision", "FilterPolicy", "Finding", "HashListPolicy", "Hit", "NsfwPolicy",
           "PRE_COLUMN", "PiiPolicy", "PostFilter", "PreFilter", "SafetyPolicy", "ToxicityPolicy",
           "WordlistPolicy", "apply_policy", "decide_row", "filter_info", "load_filter", "redact_text",
           "score_batch", "score_text"]
