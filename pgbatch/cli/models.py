"""`pgbatch models`: the model variants with their sizes."""
from __future__ import annotations

import json

HELP = "list model variants with parameter counts"


def register(parser) -> None:
  parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def main(args) -> int:
  """`pgbatch models`: every variant with its size."""
  from pgbatch.model.configs import VARIANTS, num_params
  rows = [dict(name=c.name, params_b=round(num_params(c) / 1e9, 2), image_size=c.image_size,
               image_tokens=c.num_image_tokens, text_width=c.text.width, text_depth=c.text.depth,
               gemma=c.generation) for c in VARIANTS.values()]
  if args.json:
    print(json.dumps(rows, indent=1))
    return 0
  print(f"{'variant':<14}{'params':>9}{'res':>6}{'img tokens':>12}{'width':>7}{'depth':>7}  gemma")
  for r in rows:
    print(f"{r['name']:<14}{r['params_b']:>8.2f}B{r['image_size']:>6}{r['image_tokens']:>12}"
          f"{r['text_width']:>7}{r['text_depth']:>7}  {r['gemma']}")
  return 0
