"""Hostile inputs through the real pipeline, in one run on a local Ray that this module's `pipeline.run` starts
itself (loopback, Ray's default token auth):

- a Parquet whose HF image cells point at files outside the input, at a loopback HTTP server and through other
  protocols: read/ForbiddenSource rows, no request, nothing of the refused sources in the output; the one
  prefix in input.allowed_sources is fetched;
- a 13000 x 13000 16-bit PNG (330 KB): a decode/DecodeBudgetError row naming decode.max_decoded_bytes;
- while that Ray is up, every listening socket of its processes is on 127.0.0.1.
The output is committed, read back with DuckDB and validated against the published JSON schema."""
from __future__ import annotations

import json
import os

import jsonschema
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pgbatch import config, demo, pipeline, schema_docs
from tests import pipeline_helpers as H
from tests.test_io_decode import png16_bomb
from tests.test_io_sources import recording_server

LOOPBACK = ("127.0.0.1", "::ffff:127.0.0.1")
SECRET = "contents-of-a-file-outside-the-input-7f3a"


def listening_sockets() -> list[tuple[str, str, int]]:
  """(process name, address, port) of every listening TCP socket of this process and its descendants (the Ray
  processes a local `ray.init` starts: GCS, raylet, workers, dashboard and runtime-env agents)."""
  me = psutil.Process()
  out = []
  for p in [me, *me.children(recursive=True)]:
    try:
      name = p.name()
      for c in p.net_connections(kind="inet"):
        if c.status == psutil.CONN_LISTEN:
          out.append((name, c.laddr.ip, c.laddr.port))
    except psutil.Error:
      continue
  return out


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory):
  import ray
  assert not ray.is_initialized(), "this module starts its own local Ray through pipeline.run"
  tmp = tmp_path_factory.mktemp("hostile")
  ckpt, tok = H.tiny_model(tmp / "model")
  photo = demo.samples()[0][1]
  outside = tmp / "secret.txt"
  outside.write_text(SECRET)
  (tmp / "in" / "imgs").mkdir(parents=True)
  (tmp / "in" / "imgs" / "ok.img").write_bytes(photo)
  saved = {k: os.environ.pop(k, None) for k in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
  with recording_server() as (base_url, requests):
    cells = {
        "ok_bytes": (photo, "camera/a.jpg"),
        "ok_path": (None, "imgs/ok.img"),
        "ok_allowed_http": (None, f"{base_url}/allowed/x.png"),
        "abs": (None, str(outside)),
        "dotdot": (None, "../secret.txt"),
        "file_url": (None, f"file://{outside}"),
        "http": (None, f"{base_url}/internal/metadata"),
        "http_climb": (None, f"{base_url}/allowed/../internal/x"),
        "memory": (None, "memory://bucket/a.png"),
        "bomb": (png16_bomb(), "bomb.png"),
    }
    img = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    pq.write_table(pa.table({"key": list(cells), "image": pa.array(
        [{"bytes": b, "path": p} for b, p in cells.values()], img)}), tmp / "in" / "hf.parquet")
    tree = H.job("hostile", str(tmp / "in" / "*.parquet"), str(tmp / "out") + "/", ckpt, tok, fmt="parquet",
                 fast_safety=True, decode={"batch_size": 8, "max_decoded_bytes": 64 << 20})
    tree["input"]["allowed_sources"] = [f"{base_url}/allowed/"]
    spec = config.from_dict(tree, environ={})
    try:
      summary = pipeline.run(spec, progress=False)
      sockets = listening_sockets()
      auth_mode = os.environ.get("RAY_AUTH_MODE")
      node_ip = ray.util.get_node_ip_address()
    finally:
      ray.shutdown()
      for k, v in saved.items():
        if v is not None:
          os.environ[k] = v
    yield {"summary": summary, "sockets": sockets, "auth_mode": auth_mode, "node_ip": node_ip,
           "requests": list(requests), "out": str(tmp / "out"), "spec": spec, "base_url": base_url}


def test_local_ray_listens_on_loopback_only_with_token_auth(hostile_run):
  sockets = hostile_run["sockets"]
  names = {n for n, _, _ in sockets}
  assert {"gcs_server", "raylet"} <= names, sockets  # the session's processes were seen
  assert all(ip in LOOPBACK for _, ip, _ in sockets), [s for s in sockets if s[1] not in LOOPBACK]
  assert hostile_run["node_ip"] == "127.0.0.1" and hostile_run["auth_mode"] == "token"


def test_hostile_rows_are_errors_and_nothing_outside_was_read(hostile_run):
  import duckdb
  out, summary = hostile_run["out"], hostile_run["summary"]
  assert summary.success and summary.images == 10, summary
  rows = duckdb.sql(f"SELECT key, status, error.stage AS stage, error.type AS type, error.message AS message, "
                    f"sha256, width, height, caption_en.text AS text "
                    f"FROM read_parquet('{out}/*.parquet') ORDER BY key").fetchall()
  by_key = {r[0]: r for r in rows}
  assert len(by_key) == 10
  for key in ("ok_bytes", "ok_path", "ok_allowed_http"):
    assert by_key[key][1] == "ok" and by_key[key][5] and by_key[key][8] is not None, by_key[key]
  for key in ("abs", "dotdot", "file_url", "http", "http_climb", "memory"):
    _, status, stage, type_, message, sha, w, h, text = by_key[key]
    assert (status, stage, type_) == ("error", "read", "ForbiddenSource"), by_key[key]
    assert sha is None and text is None and "input.allowed_sources" in message
  _, status, stage, type_, message, sha, w, h, _ = by_key["bomb"]
  assert (status, stage, type_, w, h) == ("error", "decode", "DecodeBudgetError", 13000, 13000)
  assert "decode.max_decoded_bytes" in message and "64 MiB" in message
  # the loopback server saw exactly the allowed fetches; the secret file left no trace in any file written
  assert hostile_run["requests"] and all(p == "/allowed/x.png" for p in hostile_run["requests"])
  for root, _, files in os.walk(out):
    for f in files:
      assert SECRET.encode() not in open(os.path.join(root, f), "rb").read(), f


def test_hostile_output_matches_the_published_schema(hostile_run):
  validator = jsonschema.Draft202012Validator(schema_docs.json_schema())
  table = pa.concat_tables(H.read_output(hostile_run["out"])[1].values())
  for r in table.to_pylist():
    validator.validate(json.loads(json.dumps(r, default=lambda d: d.isoformat())))
