"""`pgbatch safety show [--job JOB.yaml]` and `pgbatch safety calibrate OUTPUT`."""
from __future__ import annotations

import argparse
import sys

import numpy as np
import yaml
from pydantic import ValidationError

from pgbatch.safety.policy import SafetyPolicy


def register_safety(parser: argparse.ArgumentParser) -> None:
  sub = parser.add_subparsers(dest="safety_command", required=True, metavar="SUBCOMMAND")
  show = sub.add_parser("show", help="print the resolved safety policy (defaults merged with a job's safety block)")
  show.add_argument("--job", help="job spec YAML whose `safety:` block is merged over the defaults")
  cal = sub.add_parser("calibrate", help="score histograms per filter/category from an output dir of Parquet files")
  cal.add_argument("output", metavar="OUTPUT", help="output dir (any fsspec URL)")
  cal.add_argument("--bins", type=int, default=10)
  cal.add_argument("--job", help="job spec YAML: mark its thresholds in the histograms")


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


def read_scores(output: str) -> list[dict]:
  """Every `safety.scores` entry of every Parquet file under `output`."""
  import fsspec
  import pyarrow.parquet as pq
  fs, root = fsspec.core.url_to_fs(output)
  files = sorted(p for p in fs.glob(root.rstrip("/") + "/**/*.parquet") if "/_" not in p[len(root):])
  out: list[dict] = []
  for p in files:
    col = pq.read_table(p, columns=["safety"], filesystem=fs).column("safety")
    for rec in col.to_pylist():
      if rec:
        out += rec["scores"] or []
  return out


def histograms(scores: list[dict], bins: int = 10) -> dict[tuple[str, str], np.ndarray]:
  """Counts per (filter, category) over `bins` equal bins of [0, 1]."""
  by: dict[tuple[str, str], list[float]] = {}
  for s in scores:
    by.setdefault((s["filter"], s["category"]), []).append(s["score"])
  edges = np.linspace(0.0, 1.0, bins + 1)
  return {k: np.histogram(np.clip(v, 0.0, 1.0), bins=edges)[0] for k, v in sorted(by.items())}


def format_histograms(hists: dict, policy: SafetyPolicy | None = None, width: int = 40) -> str:
  lines = []
  for (flt, cat), counts in hists.items():
    bins = len(counts)
    t = policy.filter(flt).rule(cat)[0] if policy is not None else None
    lines.append(f"{flt}/{cat}  n={int(counts.sum())}" + (f"  threshold={t:g}" if t is not None else ""))
    top = max(int(counts.max()), 1)
    for b, c in enumerate(counts):
      lo, hi = b / bins, (b + 1) / bins
      mark = " <- threshold" if t is not None and lo <= t < hi else ""
      lines.append(f"  [{lo:.2f},{hi:.2f}{']' if b == bins - 1 else ')'} {int(c):8d} {'#' * round(width * c / top)}{mark}")
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
  print(format_histograms(histograms(read_scores(args.output), args.bins), policy))
  return 0
