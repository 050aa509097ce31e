"""`pgbatch inspect OUTPUT --html report.html`: a contact sheet of what a job wrote, in one self-contained file.

Per row: a thumbnail of the input image with the boxes and masks of its detect/segment columns drawn over it
(Pillow; masks decoded from the stored RLE at the original resolution, then scaled with the image), the
captions / OCR / answers, and badges for status, error (stage/type: message) and safety decision. On top: counts
per status, per shard (from the manifest) and per error reason, and buttons that filter the sheet by status.
Images are embedded as data: URIs and the style and script are inline: nothing is fetched when it is opened.

Images are read back from the input shards named in each row's `shard` / `source_uri` (WebDataset tars,
Parquet rows, image files), the shards this job read; an image that is gone shows as "image not available".
"""
from __future__ import annotations

import base64
import collections
import html
import io
from typing import Any, Iterable, Optional

import numpy as np

THUMB = 320          # longest side of a thumbnail, pixels
PALETTE = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (210, 245, 60), (0, 128, 128), (170, 110, 40))
STATUS_COLOURS = {"ok": "#2e7d32", "error": "#c62828", "filtered": "#6a1b9a"}
SAFETY_COLOURS = {"pass": "#607d8b", "flagged": "#ef6c00", "redacted": "#ad1457", "filtered": "#6a1b9a"}


def label_colour(label: str, labels: list[str]) -> tuple[int, int, int]:
  """A stable colour per class: its index in the sorted labels of the report."""
  return PALETTE[labels.index(label) % len(PALETTE)] if label in labels else PALETTE[0]


def open_rgb(data: bytes):
  """Image bytes -> RGB PIL image, EXIF orientation applied (the frame the boxes refer to)."""
  from PIL import Image, ImageOps
  from pgbatch.io.decode import to_rgb
  im = Image.open(io.BytesIO(data))
  im.seek(0)
  return to_rgb(ImageOps.exif_transpose(im))


def render(image, objects: Iterable[tuple[str, dict]], labels: list[str], thumb: int = THUMB):
  """RGB image [H, W] + (label, object) pairs -> annotated thumbnail (longest side <= thumb).

  Masks (COCO RLE over the whole original image) are blended at the original resolution; boxes are drawn on
  the scaled image at round(edge_px * scale) with a line of about 2 px, so they land on the same pixels.
  """
  from PIL import Image, ImageDraw
  from pgbatch.masks import rle_decode
  w, h = image.size
  base = np.asarray(image, np.float32).copy()
  objects = list(objects)
  for label, obj in objects:
    m = obj.get("mask")
    if m and m["height"] == h and m["width"] == w:
      inside = rle_decode(m["rle"], h, w)
      base[inside] = 0.55 * base[inside] + 0.45 * np.array(label_colour(label, labels), np.float32)
  out = Image.fromarray(base.clip(0, 255).astype(np.uint8))
  scale = min(1.0, thumb / max(w, h))
  if scale < 1.0:
    out = out.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR)
  draw = ImageDraw.Draw(out)
  for label, obj in objects:
    x0, y0 = round(obj["xmin_px"] * scale), round(obj["ymin_px"] * scale)
    x1, y1 = round(obj["xmax_px"] * scale) - 1, round(obj["ymax_px"] * scale) - 1   # *_px max are exclusive
    colour = label_colour(label, labels)
    draw.rectangle((x0, y0, max(x0, x1), max(y0, y1)), outline=colour, width=2)
    draw.text((x0 + 3, y0 + 2), label, fill=colour)
  return out


def data_uri(image) -> str:
  buf = io.BytesIO()
  image.save(buf, "PNG", optimize=True)
  return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _images_by_key(rows: list[dict]) -> dict[str, bytes]:
  """Reads the images of `rows` back from their input shards (each shard once). Missing ones are left out."""
  from pgbatch.io import readers
  out: dict[str, bytes] = {}
  by_shard = collections.defaultdict(set)
  for r in rows:
    by_shard[r["shard"]].add(r["key"])
  for shard_id, keys in by_shard.items():
    src = next(r["source_uri"] for r in rows if r["shard"] == shard_id)
    fmt = "parquet" if "#row" in src else "webdataset" if "#" in src else "images"
    uris = [shard_id] if fmt != "images" else sorted({r["source_uri"] for r in rows if r["shard"] == shard_id})
    try:
      for item in readers.read_shard(readers.Shard(shard_id, tuple(uris)), fmt):
        if item["key"] in keys and item.get("image_bytes"):
          out[item["key"]] = item["image_bytes"]
    except Exception:  # noqa: BLE001 - the report still shows the row, without its image
      continue
  return out


def _task_html(name: str, kind: str, value: Optional[dict], labels: list[str]) -> str:
  if value is None:
    return ""
  if kind in ("caption", "ocr", "answer"):
    text = value.get("text") or ""
    return (f'<div class="t"><b>{html.escape(name)}</b> {html.escape(text) if text else "<i>(empty)</i>"}'
            + (" <i>(truncated)</i>" if value.get("truncated") else "") + "</div>")
  objs = value.get("objects") or []
  items = ", ".join(
      f'<span style="color:rgb{label_colour(o["label"], labels)}">{html.escape(o["label"])}</span>'
      f' [{o["xmin_px"]},{o["ymin_px"]},{o["xmax_px"]},{o["ymax_px"]}]' + (" +mask" if o.get("mask") else "")
      for o in objs) or "<i>nothing</i>"
  errs = value.get("parse_errors") or []
  return (f'<div class="t"><b>{html.escape(name)}</b> {items}'
          + (f' <i>({len(errs)} parse error{"s" * (len(errs) != 1)})</i>' if errs else "") + "</div>")


def _card(row: dict, tasks: list[tuple[str, str]], image: Optional[bytes], labels: list[str]) -> str:
  objects = [(o["label"], o) for name, kind in tasks if kind in ("detect", "segment") and row.get(name)
             for o in row[name].get("objects") or []]
  if image is not None:
    try:
      img = f'<img src="{data_uri(render(open_rgb(image), objects, labels))}" alt="{html.escape(row["key"])}">'
    except Exception as e:  # noqa: BLE001 - an undecodable image is a row worth showing too
      img = f'<div class="noimg">cannot render: {html.escape(type(e).__name__)}</div>'
  else:
    img = '<div class="noimg">image not available</div>'
  st = row.get("status") or "?"
  badges = [f'<span class="b" style="background:{STATUS_COLOURS.get(st, "#555")}">{html.escape(st)}</span>']
  decision = (row.get("safety") or {}).get("decision")
  if decision:
    badges.append(f'<span class="b" style="background:{SAFETY_COLOURS.get(decision, "#555")}">'
                  f'safety: {html.escape(decision)}</span>')
  err = row.get("error")
  err_html = (f'<div class="err">{html.escape(str(err.get("stage")))}/{html.escape(str(err.get("type")))}: '
              f'{html.escape(str(err.get("message") or ""))[:300]}</div>') if err else ""
  body = "".join(_task_html(name, kind, row.get(name), labels) for name, kind in tasks)
  size = f'{row.get("width")}x{row.get("height")}' if (row.get("width") or -1) > 0 else ""
  return (f'<div class="card" data-status="{html.escape(st)}">{img}<div class="k">{html.escape(row["key"])} '
          f'<small>{size}</small></div>{"".join(badges)}{err_html}{body}</div>')


STYLE = """body{font:14px system-ui,sans-serif;margin:16px;color:#222}table{border-collapse:collapse;margin:4px 16px 12px 0}
td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}th{background:#f3f3f3}.tables{display:flex;flex-wrap:wrap}
.sheet{display:flex;flex-wrap:wrap;gap:12px}.card{width:330px;border:1px solid #ddd;border-radius:6px;padding:6px}
.card img{max-width:320px;display:block;margin:auto}.noimg{height:120px;background:#eee;color:#777;display:flex;
align-items:center;justify-content:center}.k{font-weight:600;margin:4px 0}.b{color:#fff;border-radius:4px;
padding:1px 6px;margin-right:4px;font-size:12px}.err{color:#c62828;margin:4px 0}.t{margin:3px 0}
button{margin-right:6px}button.on{font-weight:700}"""
SCRIPT = """function show(s){document.querySelectorAll('.card').forEach(function(c){
c.style.display=(s==='all'||c.dataset.status===s)?'':'none'});document.querySelectorAll('button').forEach(
function(b){b.className=b.dataset.s===s?'on':''})}"""


def _table(head: list[str], rows: list[list[Any]]) -> str:
  th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
  tr = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in r) + "</tr>" for r in rows)
  return f"<table><tr>{th}</tr>{tr}</table>"


def build_html(output_uri: str, limit: int = 200, storage_options: Optional[dict] = None) -> str:
  """The report of an output as one HTML string (see the module doc); at most `limit` cards."""
  import fsspec
  import pyarrow.parquet as pq
  from pgbatch import tasks as tasks_lib
  from pgbatch.io import sink as sink_lib
  entries = sorted(sink_lib.read_manifest(output_uri, storage_options), key=lambda e: e["name"])
  rows, tasks = [], []
  for e in entries:
    fs, path = fsspec.core.url_to_fs(e["file"], **(storage_options or {}))
    with fs.open(path, "rb") as f:
      table = pq.read_table(f)
    if not tasks:
      tasks = [(t.name, t.kind) for t in tasks_lib.tasks_of(table.schema)]
    rows += table.to_pylist()
  status = collections.Counter(r["status"] for r in rows)
  reasons = collections.Counter(f'{r["error"]["stage"]}/{r["error"]["type"]}' for r in rows if r.get("error"))
  shown = rows[:limit]
  labels = sorted({o["label"] for r in shown for name, kind in tasks if kind in ("detect", "segment")
                   and r.get(name) for o in r[name].get("objects") or []})
  images = _images_by_key(shown)
  buttons = "".join(f'<button data-s="{s}" onclick="show(\'{s}\')">{s} ({n})</button>'
                    for s, n in [("all", len(rows))] + sorted(status.items()))
  shard_rows = [[e["name"], e.get("rows"), e.get("ok"), e.get("error"), e.get("filtered")] for e in entries]
  reason_rows = [[r, n] for r, n in reasons.most_common()] or [["(none)", 0]]
  cards = "".join(_card(r, tasks, images.get(r["key"]), labels) for r in shown)
  more = f"<p>showing the first {len(shown)} of {len(rows)} rows</p>" if len(shown) < len(rows) else ""
  return (f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>pgbatch report: {html.escape(output_uri)}'
          f'</title><style>{STYLE}</style><script>{SCRIPT}</script></head><body>'
          f'<h2>pgbatch report</h2><p>{html.escape(output_uri)}: {len(rows)} rows in {len(entries)} committed '
          f'shard(s); tasks: {html.escape(", ".join(f"{n} ({k})" for n, k in tasks))}</p>'
          f'<div class="tables">{_table(["shard", "rows", "ok", "error", "filtered"], shard_rows)}'
          f'{_table(["error reason (stage/type)", "rows"], reason_rows)}</div>'
          f'<p>{buttons}</p>{more}<div class="sheet">{cards}</div></body></html>')


def write_html(output_uri: str, path: str, limit: int = 200, storage_options: Optional[dict] = None) -> str:
  """Writes `build_html(...)` to `path` (any fsspec URL); returns `path`."""
  import fsspec
  text = build_html(output_uri, limit, storage_options)
  with fsspec.open(path, "w", encoding="utf-8") as f:
    f.write(text)
  return path
