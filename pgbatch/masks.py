"""Instance masks: VQ-VAE logits pasted into the pixel box, encoded as COCO uncompressed RLE.

Masks cover the whole original image (`height` x `width`); `rle` are run lengths over the column-major
(Fortran-order) flattening, starting with a (possibly empty) run of zeros.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from pgbatch.tokenizer import SEGS_PER_MASK


def paste_mask(logits: np.ndarray, box_px: tuple[int, int, int, int], width: int, height: int) -> np.ndarray:
  """float [64, 64] decoder logits -> bool [height, width]: bilinear resize to the pixel box, then > 0."""
  from PIL import Image
  y1, x1, y2, x2 = box_px
  y1, y2 = max(0, min(y1, height)), max(0, min(y2, height))
  x1, x2 = max(0, min(x1, width)), max(0, min(x2, width))
  out = np.zeros((height, width), bool)
  if y2 > y1 and x2 > x1:
    img = Image.fromarray(np.ascontiguousarray(logits, np.float32)).resize((x2 - x1, y2 - y1), Image.BILINEAR)
    out[y1:y2, x1:x2] = np.asarray(img) > 0.0
  return out


def rle_encode(mask: np.ndarray) -> list[int]:
  """bool [H, W] -> COCO uncompressed RLE counts (column-major runs, first run counts zeros)."""
  flat = np.asarray(mask, bool).ravel(order="F")
  if flat.size == 0:
    return []
  change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
  bounds = np.concatenate([[0], change, [flat.size]])
  counts = np.diff(bounds).tolist()
  return ([0] + counts) if flat[0] else counts


def rle_decode(counts: Sequence[int], height: int, width: int) -> np.ndarray:
  """COCO uncompressed RLE counts -> bool [height, width]."""
  values = np.arange(len(counts)) % 2 == 1
  flat = np.repeat(values, np.asarray(counts, np.int64))
  if flat.size != height * width:
    raise ValueError(f"RLE covers {flat.size} pixels, expected {height}x{width}")
  return flat.reshape((height, width), order="F")


def attach_masks(rows: list[dict], widths: Sequence[int], heights: Sequence[int],
                 vae: Callable[[np.ndarray], np.ndarray]) -> None:
  """Replaces each object's `codes` by `mask` (or None), decoding every row's codes in one VAE call."""
  todo = [(r, o) for r in range(len(rows)) for o in rows[r]["objects"] if o.get("codes") is not None]
  logits = vae(np.array([o["codes"] for _, o in todo], np.int32).reshape(-1, SEGS_PER_MASK)) if todo else []
  for (r, obj), m64 in zip(todo, logits):
    w, h = int(widths[r]), int(heights[r])
    box = (obj["ymin_px"], obj["xmin_px"], obj["ymax_px"], obj["xmax_px"])
    obj["mask"] = {"height": h, "width": w, "rle": rle_encode(paste_mask(m64, box, w, h))}
  for row in rows:
    for obj in row["objects"]:
      obj.pop("codes", None)
      obj.setdefault("mask", None)
