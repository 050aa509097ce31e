"""The HTML report's drawing: boxes land on the pixels the row's `*_px` edges name, masks come from the stored RLE.

The report on a real output (the demo's, read back from its shards) is checked in test_demo.py.
"""
import base64
import io
import re

import numpy as np
from PIL import Image

from pgbatch import report
from pgbatch.masks import rle_encode
from pgbatch.tasks import to_pixels

GRAY = (128, 128, 128)


def _obj(label, ymin, xmin, ymax, xmax, w, h, mask=None):
  o = to_pixels({"label": label, "ymin": ymin, "xmin": xmin, "ymax": ymax, "xmax": xmax}, w, h)
  if mask is not None:
    o["mask"] = {"height": h, "width": w, "rle": rle_encode(mask)}
  return o


def test_box_and_mask_land_on_the_expected_pixels_at_full_size():
  w, h = 100, 80
  mask = np.zeros((h, w), bool)
  mask[30:40, 40:50] = True
  obj = _obj("cat", 0.125, 0.2, 0.625, 0.6, w, h, mask)          # px: y 10..50, x 20..60 (exclusive)
  assert (obj["ymin_px"], obj["xmin_px"], obj["ymax_px"], obj["xmax_px"]) == (10, 20, 50, 60)
  out = np.asarray(report.render(Image.new("RGB", (w, h), GRAY), [("cat", obj)], ["cat"]))
  colour = report.label_colour("cat", ["cat"])
  assert out.shape == (h, w, 3)
  for y, x in ((30, 20), (30, 21), (30, 59), (30, 58), (10, 40), (49, 40)):   # the four edges, 2 px inward
    assert tuple(out[y, x]) == colour, (y, x, out[y, x])
  for y, x in ((30, 19), (30, 60), (9, 40), (50, 40), (5, 5), (70, 90)):        # just outside, far away
    assert tuple(out[y, x]) == GRAY, (y, x)
  blended = tuple(np.round(0.55 * np.array(GRAY) + 0.45 * np.array(colour)).astype(int))
  assert all(abs(int(a) - b) <= 1 for a, b in zip(out[35, 45], blended))      # inside the mask
  assert tuple(out[25, 30]) == GRAY                                             # inside the box, outside the mask


def test_box_scales_with_the_thumbnail():
  w, h = 640, 480
  obj = _obj("cup", 0.25, 0.25, 0.75, 0.5, w, h)                 # px: y 120..360, x 160..320
  out = np.asarray(report.render(Image.new("RGB", (w, h), GRAY), [("cup", obj)], ["cat", "cup"], thumb=320))
  colour = report.label_colour("cup", ["cat", "cup"])
  assert out.shape == (240, 320, 3) and colour != report.label_colour("cat", ["cat", "cup"])
  assert tuple(out[120, 80]) == colour and tuple(out[120, 159]) == colour       # x 160/2, (320/2) - 1
  assert tuple(out[120, 78]) == GRAY and tuple(out[120, 161]) == GRAY


def images_in(html_text: str) -> list[tuple[str, Image.Image]]:
  """(alt, decoded image) of every embedded thumbnail."""
  out = []
  for data, alt in re.findall(r'<img src="data:image/png;base64,([^"]+)" alt="([^"]*)">', html_text):
    out.append((alt, Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")))
  return out


def assert_self_contained(html_text: str):
  """Nothing to fetch: every src is a data: URI, no external links, stylesheets or scripts."""
  assert html_text.startswith("<!DOCTYPE html>") and html_text.rstrip().endswith("</html>")
  srcs = re.findall(r'\bsrc="([^"]*)"', html_text)
  assert srcs and all(s.startswith("data:") for s in srcs)
  assert not re.search(r'\b(href|src)="(https?:|//|file:)', html_text) and "<link" not in html_text
  assert "@import" not in html_text and "url(" not in html_text
