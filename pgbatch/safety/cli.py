"""`pgbatch safety show [--job JOB.yaml]` and `pgbatch safety calibrate OUTPUT`."""
from __future__ import annotations

import argparse
import sys

import numpy as np
import yaml
from pydantic import ValidationError

from pgbatch.safety.policy import SafetyPolicy


def positive_int(v: str) -> int:
  if not v.isdigit() or int(v) < 1:
    raise argparse.ArgumentTypeError(f"expected a positive integer, got {v!r}")
  return int(v)


def register_safety(parser: argparse.ArgumentParser) -> None:
  sub = parser.add_subparsers(dest="safety_command", required=True, metavar="SUBCOMMAND")
  show = sub.add_parser("show", help="print the resolved safety policy (defaults merged with a job's safety block)")
  show.add_argument("--job", help="job spec YAML whose `safety:` block is merged over the defaults")
  cal = sub.add_parser("calibrate", help="score histograms per filter/category from an output dir of Parquet files")
  cal.add_argument("output", metavar="OUTPUT", help="output dir (any fsspec URL)")
  cal.add_argument("--bins", type=positive_int, default=10, help="equal-width bins over [0, 1] (default 10)")
  cal.add_argument("--by-field", action="store_true", help="one histogram per scored column too")
  cal.add_argument("--job", help="job spec YAML: mark its thresholds (default: the shipped policy's)")


def load_policy(job: str | None) -> SafetyPolicy:
  """Policy from a job spec's `safety:` block (any fsspec URL), or the defaults."""
  if not job:
    return SafetyPolicy.default()
  import fsspec
  with fsspec.open(job, "rt") as f:
    spec = yaml.safe_load(f) or {}
  return SafetyPolicy.model_validate(spec.get("safety"))


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


def main_safety(args: argparse.Namespace) -> int:
  try:
    policy = load_policy(getattr(args, "job", None))
  except ValidationError as e:
    print(f"invalid safety policy:\n{e}", file=sys.stderr)
    return 2
  if args.safety_command == "show":
    print(show_text(policy), end="")
    return 0
  if not parquet_files(args.output)[1]:
    print(f"no Parquet files under {args.output}", file=sys.stderr)
    return 1
  groups = group_scores(read_scores(args.output), args.by_field)
  print(format_histograms(groups, args.bins, policy))
  return 0
