"""Indirect image sources in Parquet (string column, HF struct<bytes, path> with null bytes) are confined to the
input's own folder plus `input.allowed_sources`: hostile paths become read/ForbiddenSource rows with no request,
no file open, and nothing of the refused source in the row."""
from __future__ import annotations

import contextlib
import http.server
import io
import json
import os
import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pgbatch.io import sources
from pgbatch.io.readers import Shard, read_shard
from pgbatch.io.sources import ForbiddenSource, allowed_roots, confine, input_root


def png(color=(0, 128, 255)) -> bytes:
  buf = io.BytesIO()
  Image.new("RGB", (5, 4), color).save(buf, "PNG")
  return buf.getvalue()


IMG = png()
SECRET = b"top-secret-contents-of-a-file-outside-the-input\n"


@contextlib.contextmanager
def recording_server():
  """A loopback HTTP server that answers every GET/HEAD with IMG and records every request path."""
  requests: list[str] = []

  class Handler(http.server.BaseHTTPRequestHandler):
    def _answer(self, body: bool):
      requests.append(self.path)
      if "redirect" in self.path:  # an allowed server sending us elsewhere
        self.send_response(302)
        self.send_header("Location", "/internal/metadata")
        self.send_header("Content-Length", "0")
        self.end_headers()
        return
      self.send_response(200)
      self.send_header("Content-Type", "image/png")
      self.send_header("Content-Length", str(len(IMG)))
      self.end_headers()
      if body:
        self.wfile.write(IMG)

    def do_GET(self):  # noqa: N802
      self._answer(True)

    def do_HEAD(self):  # noqa: N802
      self._answer(False)

    def log_message(self, *args):
      pass

  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  try:
    yield f"http://127.0.0.1:{server.server_address[1]}", requests
  finally:
    server.shutdown()
    server.server_close()


def test_input_root_is_the_static_folder_of_the_input_uri(tmp_path):
  assert input_root("gs://b/data/*.parquet") == "gs://b/data/"
  assert input_root("gs://b/data/part-{000..009}.parquet") == "gs://b/data/"
  assert input_root("gs://b/data/x.parquet") == "gs://b/data/"
  assert input_root("gcs://b/data/") == "gs://b/data/"
  assert input_root("gs://b/data") == "gs://b/data/"
  assert input_root(str(tmp_path / "in" / "**" / "*.parquet")) == str(tmp_path / "in") + "/"
  assert input_root("file://" + str(tmp_path / "a.parquet")) == str(tmp_path) + "/"
  assert allowed_roots("gs://b/d/*.pq", ["https://CDN.example.com/img", "gs://o/x/../y/"]) == (
      "gs://b/d/", "https://cdn.example.com/img", "gs://o/y")


@pytest.mark.parametrize("path, allowed", [
    ("a.png", "gs://b/d/a.png"),
    ("sub/../a.png", "gs://b/d/a.png"),
    ("gs://b/d/sub/a.png", "gs://b/d/sub/a.png"),
    ("gcs://b/d/a.png", "gs://b/d/a.png"),
    ("../a.png", None),
    ("sub/../../d2/a.png", None),
    ("gs://b/d2/a.png", None),           # a sibling prefix is not under gs://b/d/
    ("gs://b/d/../e/a.png", None),
    ("gs://other/d/a.png", None),
    ("/etc/passwd", None),
    ("file:///etc/passwd", None),
    ("http://169.254.169.254/computeMetadata/v1/", None),
    ("memory://d/a.png", None),
    ("simplecache::gs://b/d/a.png", None),
    ("data:image/png;base64,AAAA", None),
    ("%2e%2e/x.png", None),
    ("..\\x.png", None),
    ("x://y/a.png", None),
])
def test_confine_default_root(path, allowed):
  roots = allowed_roots("gs://b/d/*.parquet")
  if allowed is None:
    with pytest.raises(ForbiddenSource, match="input.allowed_sources"):
      confine(path, "gs://b/d/p.parquet", roots)
  else:
    assert confine(path, "gs://b/d/p.parquet", roots) == allowed


def test_confine_allowed_sources_match_whole_segments():
  roots = allowed_roots("gs://b/d/*.parquet", ["https://cdn.example.com/img/"])
  assert confine("https://cdn.example.com/img/a.png?v=1", "gs://b/d/p.parquet", roots) == \
      "https://cdn.example.com/img/a.png?v=1"
  for bad in ("https://cdn.example.com/imgs/a.png", "https://cdn.example.com/img/../admin",
              "https://cdn.example.com@evil.com/img/a.png", "http://cdn.example.com/img/a.png",
              "https://cdn.example.com.evil.com/img/a.png"):
    with pytest.raises(ForbiddenSource):
      confine(bad, "gs://b/d/p.parquet", roots)


def hostile_parquet(folder, base_url: str, outside) -> None:
  """p.parquet with a string image column and hf.parquet with struct<bytes, path>, both full of hostile paths."""
  folder.mkdir(parents=True, exist_ok=True)
  (folder / "imgs").mkdir()
  (folder / "imgs" / "ok.png").write_bytes(IMG)
  os.symlink(outside, folder / "imgs" / "link.png")  # inside the input folder, pointing out of it
  paths = {
      "ok": "imgs/ok.png",
      "abs": str(outside),
      "dotdot": "../" * 12 + str(outside).lstrip("/"),
      "file_url": f"file://{outside}",
      "symlink": "imgs/link.png",
      "http": f"{base_url}/steal.png",
      "http_allowed": f"{base_url}/allowed/a.png",
      "http_climb": f"{base_url}/allowed/../other/b.png",
      "http_sibling": f"{base_url}/allowedx/c.png",
      "http_redirect": f"{base_url}/allowed/redirect.png",
      "memory": "memory://x/a.png",
      "chained": f"simplecache::file://{outside}",
      "encoded": "imgs/%2e%2e/%2e%2e/x.png",
  }
  keys = list(paths)
  pq.write_table(pa.table({"key": keys, "image": [paths[k] for k in keys]}), folder / "p.parquet")
  img = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
  cells = [{"bytes": None, "path": paths[k]} for k in keys]
  pq.write_table(pa.table({"key": keys, "image": pa.array(cells, img)}), folder / "hf.parquet")


def check_rows(rows: list[dict], allowed_http: bool) -> None:
  by_key = {r["key"]: r for r in rows}
  assert len(rows) == 13
  ok = {"ok"} | ({"http_allowed"} if allowed_http else set())
  for key, r in by_key.items():
    if key in ok:
      assert r["status"] == "ok" and r["image_bytes"] == IMG, (key, r)
      continue
    if key == "http_redirect" and allowed_http:  # fetched, but the redirect is not followed: no image
      assert r["status"] == "ok" and r["image_bytes"] == b"", r
      continue
    err = r["error"]
    assert (r["status"], err["stage"], err["type"]) == ("error", "read", "ForbiddenSource"), (key, r)
    assert r["image_bytes"] is None
    blob = json.dumps(r, default=repr)
    assert SECRET.decode().strip() not in blob and str(len(SECRET)) not in err["message"], (key, r)


@pytest.mark.parametrize("name", ["p.parquet", "hf.parquet"])
def test_hostile_parquet_reads_nothing_outside_the_input(tmp_path, name):
  outside = tmp_path / "secret.txt"
  outside.write_bytes(SECRET)
  with recording_server() as (base_url, requests):
    hostile_parquet(tmp_path / "in", base_url, outside)
    uri = str(tmp_path / "in" / name)
    roots = allowed_roots(str(tmp_path / "in" / "*.parquet"))
    check_rows(read_shard(Shard(uri, (uri,)), "parquet", allowed_roots=roots), allowed_http=False)
    check_rows(read_shard(Shard(uri, (uri,)), "parquet"), allowed_http=False)  # default: the shard's folder
    assert requests == []
    # allowed_sources lets exactly that prefix through (and still nothing climbs out of it)
    roots = allowed_roots(str(tmp_path / "in" / "*.parquet"), [f"{base_url}/allowed/"])
    check_rows(read_shard(Shard(uri, (uri,)), "parquet", allowed_roots=roots), allowed_http=True)
    assert requests and set(requests) == {"/allowed/a.png", "/allowed/redirect.png"}, requests


def test_storage_options_go_only_to_the_inputs_own_protocol():
  opts = {"token": "x"}
  assert sources.storage_options_for("gs://o/a.png", "gs://b/d/p.parquet", opts) == opts
  assert sources.storage_options_for("https://cdn/a.png", "gs://b/d/p.parquet", opts) == {"allow_redirects": False}
  assert sources.storage_options_for("/d/a.png", "gs://b/d/p.parquet", opts) is None


def test_spec_allowed_sources_are_prefixes(tmp_path):
  from pgbatch import config
  base = {"name": "j", "input": {"uri": "gs://b/d/*.parquet", "format": "parquet"}, "output": {"uri": "gs://b/o/"},
          "model": {"checkpoint": "gs://b/m.npz", "tokenizer": "gs://b/t.model"},
          "tasks": [{"name": "c", "kind": "caption"}]}
  spec = config.from_dict({**base, "input": {**base["input"], "allowed_sources": ["gs://o/img/", "imgs"]}},
                          base=tmp_path, environ={})
  assert spec.input.allowed_sources == ["gs://o/img/", str(tmp_path / "imgs")]
  for bad in ("simplecache::gs://o/", "gs://o/*.png"):
    with pytest.raises(config.JobSpecError, match=r"input.allowed_sources"):
      config.from_dict({**base, "input": {**base["input"], "allowed_sources": [bad]}}, environ={})
