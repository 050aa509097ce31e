"""Safety scores of an output, grouped and binned for calibrating thresholds (`pgbatch safety calibrate`), and
the resolved policy as text (`pgbatch safety show`)."""
from __future__ import annotations

import numpy as np
import yaml

from pgbatch.safety.policy import SafetyPolicy


def show_text(policy: SafetyPolicy) -> str:
  body = yaml.safe_dump(policy.model_dump(mode="json"), sort_keys=False)
  return f"# policy_digest: {policy.digest()}\n# enabled: {', '.join(policy.enabled())}\n{body}"


def parquet_files(output: str) -> tuple[object, list[str]]:
  """(filesystem, data files under `output`), skipping `_`-prefixed entries (manifest, temporaries)."""
  import fsspec
  fs, root = fsspec.core.url_to_fs(output)
  root = root.rstrip("/")
  files = sorted(p for p in fs.glob(root + "/**/*.parquet") if "/_" not in p[len(root):])
  return fs, files


def read_scores(output: str) -> list[dict]:
  """Every `safety.scores` entry of every Parquet file under `output` (any fsspec URL)."""
  import pyarrow.parquet as pq
  fs, files = parquet_files(output)
  out: list[dict] = []
  for p in files:
    col = pq.read_table(p, columns=["safety"], filesystem=fs, use_threads=False).column("safety")
    for rec in col.to_pylist():
      if rec:
        out += rec["scores"] or []
  return out


Key = tuple  # (filter, category) or (filter, category, field)


def group_scores(scores: list[dict], by_field: bool = False) -> dict[Key, np.ndarray]:
  """Scores [n] float per (filter, category[, field]), sorted by key."""
  by: dict[Key, list[float]] = {}
  for s in scores:
    k = (s["filter"], s["category"]) + ((s["field"],) if by_field else ())
    by.setdefault(k, []).append(s["score"])
  return {k: np.clip(np.asarray(v, dtype=np.float64), 0.0, 1.0) for k, v in sorted(by.items())}


def histograms(scores: list[dict], bins: int = 10, by_field: bool = False) -> dict[Key, np.ndarray]:
  """Counts [bins] per (filter, category[, field]) over equal bins of [0, 1] (the last one closed)."""
  edges = np.linspace(0.0, 1.0, bins + 1)
  return {k: np.histogram(v, bins=edges)[0] for k, v in group_scores(scores, by_field).items()}


def format_histograms(groups: dict[Key, np.ndarray], bins: int = 10, policy: SafetyPolicy | None = None,
                      width: int = 40) -> str:
  """Text histograms of grouped scores; with a policy, its threshold is marked and rows at/above it counted."""
  lines = []
  edges = np.linspace(0.0, 1.0, bins + 1)
  for key, v in groups.items():
    counts = np.histogram(v, bins=edges)[0]
    flt, cat = key[0], key[1]
    t = policy.filter(flt).rule(cat)[0] if policy is not None and flt in type(policy).model_fields else None
    head = "/".join(key) + f"  n={v.size}"
    if t is not None:
      head += f"  threshold={t:g}  at/above={int((v >= np.float32(t)).sum())}"  # scores are stored as float32
    lines.append(head)
    top = max(int(counts.max()), 1)
    for b, c in enumerate(counts):
      lo, hi, last = edges[b], edges[b + 1], b == bins - 1
      mark = " <- threshold" if t is not None and (lo <= t < hi or last and t == hi) else ""
      lines.append(f"  [{lo:.2f},{hi:.2f}{']' if last else ')'} {int(c):8d} {'#' * round(width * c / top)}{mark}")
  return "\n".join(lines) if lines else "no safety scores found"
