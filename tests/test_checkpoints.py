"""Checkpoints: every published format, from local paths, file://, gs:// (loopback GCS emulator) and http:// (a
loopback server with Range requests), streamed onto a mesh of 8 virtual CPU devices, with the errors users see
for broken files.

One tiny PaliGemma 2 (full 257152-row vocabulary) is written once per module in each format; every load must give
bit-identical parameters and logits to the model built from the same arrays in memory.
"""
import functools
import hashlib
import http.server
import io
import json
import os
import re
import shutil
import threading
import weakref

import jax
import ml_dtypes
import numpy as np
import pytest
from flax import traverse_util
from safetensors.numpy import load_file, save_file

from pgbatch import checkpoints as C
from pgbatch.checkpoints.architecture import _dims
from pgbatch.checkpoints.checkpoint import _fingerprint
from pgbatch import tokenizer as T
from pgbatch.cli import main
from pgbatch.model import configs, from_params, load, make_mesh, random_params
from pgbatch.model.loading import place
from pgbatch.model.sharding import param_sharding

BF16 = np.dtype(ml_dtypes.bfloat16)
CFG = configs.get("tiny-pg2")
# Formats written by the fixture: name → (path relative to the fixture dir, stored dtype).
FORMATS = {
    "npz": ("pg2.npz", np.float32),
    "b16_npz": ("pg2.b16.npz", BF16),
    "f16_npz": ("pg2.f16.npz", np.float16),
    "npz_parts": ("split/pg2.npz", np.float32),          # only pg2.npz.part00..02 exist
    "hf_single": ("hf_single", np.float32),
    "hf_sharded": ("hf_sharded", np.float32),
    "hf_new_keys": ("hf_new_keys", np.float32),        # transformers >= 4.52 key spelling (model.*, lm_head)
}


def flat(model):
  return traverse_util.flatten_dict(model.params, sep="/")


def split_file(src, dst_base, n):
  """Writes src as dst_base.part00 … part{n-1} (cut at arbitrary byte offsets, mid-member); returns the paths."""
  data = open(src, "rb").read()
  cuts = [0] + [len(data) * (i + 1) // n + 7 * i for i in range(n - 1)] + [len(data)]
  paths = []
  for i in range(n):
    paths.append(f"{dst_base}.part{i:02d}")
    with open(paths[-1], "wb") as f:
      f.write(data[cuts[i]:cuts[i + 1]])
  return paths


def respell_hf(src_dir, dst_dir):
  """The same HF checkpoint with the key names newer transformers use in memory and may save."""
  os.makedirs(dst_dir)
  shutil.copy(f"{src_dir}/config.json", dst_dir)
  tensors = load_file(f"{src_dir}/model.safetensors")
  renamed = {}
  for k, v in tensors.items():
    for old, new in (("language_model.model.", "model.language_model."), ("vision_tower.", "model.vision_tower."),
                     ("multi_modal_projector.", "model.multi_modal_projector.")):
      if k.startswith(old):
        k = new + k[len(old):]
    renamed[k] = v
  renamed["lm_head.weight"] = renamed["model.language_model.embed_tokens.weight"]  # tied, saved untied
  save_file(renamed, f"{dst_dir}/model.safetensors", metadata={"format": "pt"})


@pytest.fixture(scope="module")
def params():
  return random_params(CFG, seed=7)


def stored(params, dtype):
  return {k: v.astype(dtype) for k, v in params.items()}


@pytest.fixture(scope="module")
def ckdir(params, tmp_path_factory):
  d = tmp_path_factory.mktemp("ckpts")
  C.write_npz(params, str(d / "pg2.npz"))
  C.write_npz(stored(params, BF16), str(d / "pg2.b16.npz"))
  C.write_npz(stored(params, np.float16), str(d / "pg2.f16.npz"))
  os.makedirs(d / "split")
  split_file(d / "pg2.npz", d / "split" / "pg2.npz", 3)
  C.write_hf(params, CFG, str(d / "hf_single"))
  C.write_hf(params, CFG, str(d / "hf_sharded"), max_shard_bytes=4 << 20)
  respell_hf(d / "hf_single", d / "hf_new_keys")
  return d


@pytest.fixture(scope="module")
def gcs_ckpts(gcs, ckdir):
  """The same files in the emulator bucket: gs://BUCKET/ckpt-test/…"""
  fs, bucket = gcs
  for name in os.listdir(ckdir):
    fs.put(str(ckdir / name), f"{bucket}/ckpt-test/{name}", recursive=True)
  return f"gs://{bucket}/ckpt-test"


@pytest.fixture(scope="module")
def batch():
  rng = np.random.default_rng(0)
  images = rng.uniform(-1, 1, (8, CFG.image_size, CFG.image_size, 3)).astype(np.float32)  # 8: data-parallel
  tokens = rng.integers(3, 257152, (8, 7)).astype(np.int32)
  tokens[:, 0] = 2
  return images, tokens, rng.integers(1, 8, 8).astype(np.int32)


@pytest.fixture(scope="module")
def reference(params, batch):
  """Logits of the in-memory model per stored dtype (weights rounded to that dtype, computed in float32)."""
  out = {}
  for dtype in (np.float32, BF16, np.float16):
    model = from_params(CFG, {k: v.astype(dtype).astype(np.float32) for k, v in params.items()}, "float32")
    out[np.dtype(dtype)] = np.asarray(model.logits(*batch))
  return out


class RangeHandler(http.server.SimpleHTTPRequestHandler):
  """Static files with HTTP Range support (what object stores and CDNs serve), directory listings as HTML."""

  def send_head(self):
    path = self.translate_path(self.path)
    m = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range") or "")
    if m is None or not os.path.isfile(path):
      return super().send_head()
    size = os.path.getsize(path)
    start, end = int(m[1]), min(int(m[2]) if m[2] else size - 1, size - 1)
    with open(path, "rb") as f:
      f.seek(start)
      body = f.read(max(0, end - start + 1))
    self.send_response(206)
    self.send_header("Content-Type", "application/octet-stream")
    self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
    self.send_header("Content-Length", str(len(body)))
    self.end_headers()
    return io.BytesIO(body)

  def log_message(self, *args):
    pass


@pytest.fixture(scope="module")
def http_root(ckdir):
  """ckdir served over HTTP on loopback: http://127.0.0.1:PORT"""
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(RangeHandler, directory=str(ckdir)))
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  yield f"http://127.0.0.1:{server.server_address[1]}"
  server.shutdown()
  server.server_close()


def uri_of(where, fmt, ckdir, gcs_root, http_root=None):
  rel = FORMATS[fmt][0]
  return {"path": str(ckdir / rel), "file": f"file://{ckdir / rel}", "gs": f"{gcs_root}/{rel}",
          "http": f"{http_root}/{rel}"}[where]


# ---------------------------------------------------------------------------------------------------------------
# Round trips: every format, every location, identical parameters and logits.


@pytest.mark.parametrize("where", ["path", "file", "gs", "http"])
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_every_format_and_location_gives_identical_logits(fmt, where, params, ckdir, gcs_ckpts, http_root, batch,
                                                          reference):
  uri = uri_of(where, fmt, ckdir, gcs_ckpts, http_root)
  model = load(uri, dtype="float32")
  assert model.config == CFG and model.info.uri == uri
  assert model.info.format == (C.FORMAT_HF if fmt.startswith("hf") else C.FORMAT_NPZ)
  got = flat(model)
  assert set(got) == set(params)
  dtype = np.dtype(FORMATS[fmt][1])
  for name, value in params.items():
    a = np.asarray(got[name])
    assert a.dtype == np.float32 and np.array_equal(a, value.astype(dtype).astype(np.float32)), name
  assert np.array_equal(np.asarray(model.logits(*batch)), reference[dtype])


def test_stored_dtype_is_reported_and_kept(ckdir):
  for fmt, (rel, dtype) in FORMATS.items():
    with C.open_checkpoint(str(ckdir / rel)) as ck:
      assert {d for _, d in ck.names_and_shapes().values()} == {np.dtype(dtype)}, fmt
      name, first = next(ck.tensors())
      assert first.dtype == dtype and name in configs.param_shapes(CFG)


def test_hf_files_are_what_transformers_expects(ckdir):
  cfg = json.load(open(ckdir / "hf_single" / "config.json"))
  assert cfg["model_type"] == "paligemma" and cfg["text_config"]["model_type"] == "gemma2"
  assert cfg["image_token_index"] == 257152 and cfg["vocab_size"] == 257216
  t = load_file(ckdir / "hf_single" / "model.safetensors")
  assert t["language_model.model.embed_tokens.weight"].shape == (257216, 64)
  assert t["vision_tower.vision_model.embeddings.patch_embedding.weight"].shape == (32, 3, 14, 14)
  assert t["language_model.model.layers.1.self_attn.k_proj.weight"].shape == (2 * 16, 64)
  index = json.load(open(ckdir / "hf_sharded" / "model.safetensors.index.json"))
  shards = sorted(set(index["weight_map"].values()))
  assert len(shards) >= 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
  assert sorted(f for f in os.listdir(ckdir / "hf_sharded") if f.endswith(".safetensors")) == shards
  assert set(index["weight_map"]) == set(t)


def test_hf_written_by_us_loads_in_transformers(ckdir, params, batch, reference):
  torch = pytest.importorskip("torch")
  from transformers import PaliGemmaForConditionalGeneration
  hf = PaliGemmaForConditionalGeneration.from_pretrained(str(ckdir / "hf_sharded"), attn_implementation="eager",
                                                         torch_dtype=torch.float32).eval()
  images, tokens, prefix_len = batch
  p = CFG.num_image_tokens
  ids = np.concatenate([np.full((len(tokens), p), 257152), tokens], 1)
  token_type = np.concatenate([np.zeros((len(tokens), p)), np.arange(tokens.shape[1])[None] >= prefix_len[:, None]], 1)
  with torch.no_grad():
    ref = hf(input_ids=torch.tensor(ids), pixel_values=torch.tensor(images.transpose(0, 3, 1, 2)),
             token_type_ids=torch.tensor(token_type, dtype=torch.long),
             labels=torch.tensor(ids)).logits.numpy()[:, p:, :257152]
  ours = reference[np.dtype(np.float32)]  # config.json written without the final softcap (big_vision numerics)
  assert np.linalg.norm(ref - ours) / np.linalg.norm(ours) < 1e-4


# ---------------------------------------------------------------------------------------------------------------
# Streaming onto a mesh, casting while reading.


@pytest.mark.parametrize("fmt,where,mesh_shape", [("npz", "path", (2, 4)), ("hf_sharded", "gs", (4, 2)),
                                                  ("npz_parts", "gs", (8, 1))])
def test_streams_onto_mesh_with_param_shardings(fmt, where, mesh_shape, params, ckdir, gcs_ckpts, batch,
                                                reference):
  assert jax.device_count() == 8
  mesh = make_mesh(*mesh_shape)
  model = load(uri_of(where, fmt, ckdir, gcs_ckpts), dtype="float32", mesh=mesh)
  got = flat(model)
  for name, value in params.items():
    arr = got[name]
    assert arr.sharding == param_sharding(name, value.shape, mesh), name
    assert len(arr.sharding.device_set) == 8 and np.array_equal(np.asarray(arr), value), name
  q = got["llm/layers/attn/q_einsum/w"]          # [L, N=4, D, H]: heads split over "model"
  assert q.sharding.spec[1] == ("model" if mesh_shape[1] > 1 else None)
  assert q.addressable_shards[0].data.shape[1] == 4 // mesh_shape[1]
  emb = got["llm/embedder/input_embedding"]    # [V, D]: vocab split over "model"
  assert emb.addressable_shards[0].data.shape == (257152 // mesh_shape[1], 64)
  if mesh_shape == (2, 4):  # one sharded forward (compiling one per mesh is slow on 2 cores)
    np.testing.assert_allclose(np.asarray(model.logits(*batch)), reference[np.dtype(np.float32)], rtol=2e-5,
                               atol=2e-4)


@pytest.mark.parametrize("fmt", ["npz", "hf_sharded", "b16_npz"])
def test_casts_while_reading(fmt, params, ckdir):
  src = np.dtype(FORMATS[fmt][1])
  for target in (BF16, np.dtype(np.float16), np.dtype(np.float32)):
    with C.open_checkpoint(str(ckdir / FORMATS[fmt][0])) as ck:
      for name, a in ck.tensors(dtype=target):
        assert a.dtype == target and a.flags.c_contiguous, name
        assert np.array_equal(a, params[name].astype(src).astype(target)), (name, target)
  model = load(str(ckdir / FORMATS[fmt][0]), dtype="bfloat16")
  assert {str(a.dtype) for a in flat(model).values()} == {"bfloat16"}
  assert model.dtype == BF16


def test_one_tensor_at_a_time(ckdir):
  """Host arrays are handed over one by one and none is kept by the reader: when tensor k is read, every
  earlier host array is already gone (so peak host memory is about the largest tensor)."""
  for fmt in ("npz_parts", "hf_sharded"):
    alive = []
    with C.open_checkpoint(str(ckdir / FORMATS[fmt][0])) as ck:
      for i, (_, a) in enumerate(ck.tensors(dtype=BF16)):
        assert sum(r() is not None for r in alive) == 0, (fmt, i)
        alive.append(weakref.ref(a))
        del a
    assert i + 1 == len(configs.param_shapes(CFG))


def test_place_keeps_no_host_copy(ckdir):
  """`place` holds at most the tensor in flight and the one before it (waited on before the next is read).
  On CPU a placed array may alias its host buffer, so the consumer here drops the placed arrays too."""
  mesh = make_mesh(2, 4)
  alive, n = [], 0
  with C.open_checkpoint(str(ckdir / "pg2.npz")) as ck:
    orig = ck._reader  # pylint: disable=protected-access

    def tracked(name, dtype):
      a = orig(name, dtype)
      alive.append(weakref.ref(a))
      return a
    ck._reader = tracked  # pylint: disable=protected-access
    for name, arr in place(ck, BF16, mesh):
      assert arr.dtype == BF16 and arr.sharding == param_sharding(name, arr.shape, mesh)
      assert sum(r() is not None for r in alive[:-2]) == 0, name
      n += 1
      del arr
  assert n == len(alive) == len(configs.param_shapes(CFG))


# ---------------------------------------------------------------------------------------------------------------
# Provenance.


def fs_info(info):
  return info.fs.info(info.files[0][0])


def test_provenance_digest_and_sha256(ckdir, gcs_ckpts, tmp_path):
  npz = str(ckdir / "pg2.npz")
  a, b = C.open_checkpoint(npz), C.open_checkpoint(npz)
  assert a.info.digest == b.info.digest and len(a.info.digest) == 64
  whole = hashlib.sha256(open(npz, "rb").read()).hexdigest()
  assert a.info.full_sha256() == whole
  # Split parts hash to the same content as the file they were cut from, locally and on GCS.
  assert C.open_checkpoint(str(ckdir / "split/pg2.npz")).info.full_sha256() == whole
  remote = C.open_checkpoint(f"{gcs_ckpts}/split/pg2.npz")
  assert remote.info.full_sha256() == whole and len(remote.info.files) == 3
  gcs_info = C.open_checkpoint(f"{gcs_ckpts}/pg2.npz").info
  assert gcs_info.digest != a.info.digest  # GCS: md5 of the content; local: mtime
  assert _fingerprint(fs_info(gcs_info)).startswith("md5Hash=")  # pylint: disable=protected-access
  # A changed file changes the cheap digest.
  copy = tmp_path / "copy.npz"
  shutil.copy(npz, copy)
  before = C.open_checkpoint(str(copy)).info
  with open(copy, "ab") as f:
    f.write(b"\0")
  assert C.open_checkpoint(str(copy)).info.digest != before.digest
  # HF directory: per-file hashes, stable across local and GCS copies.
  hf = C.open_checkpoint(str(ckdir / "hf_sharded")).info
  assert hf.full_sha256() == C.open_checkpoint(f"{gcs_ckpts}/hf_sharded").info.full_sha256()
  assert [os.path.basename(p) for p, _ in hf.files][:2] == ["config.json", "model.safetensors.index.json"]
  model = load(npz, dtype="float32")
  assert model.info.uri == npz and model.info.digest == a.info.digest
  assert model.info.as_dict() == dict(uri=npz, format="big_vision_npz", digest=a.info.digest)


# ---------------------------------------------------------------------------------------------------------------
# Config inference.


def test_config_inferred_from_shapes_for_every_variant():
  for name, cfg in configs.VARIANTS.items():
    assert C.config_from_shapes(configs.param_shapes(cfg)) == cfg, name


def test_config_inferred_from_hf_config_for_every_variant():
  for name, cfg in configs.VARIANTS.items():
    got = C.config_from_hf(json.loads(json.dumps(C.hf_config_dict(cfg))))
    assert got.name == name and _dims(got) == _dims(cfg), name  # pylint: disable=protected-access
    if cfg.text.post_norms:  # HF numerics written explicitly
      assert got.text.attn_logits_softcap == 50.0 and got.text.query_scale == pytest.approx(cfg.text.query_scale)


def test_unregistered_architecture_is_inferred(tmp_path):
  cfg = configs.PaliGemmaConfig("x", configs.VisionConfig(width=48, depth=3, mlp_dim=96, num_heads=3),
                                configs.TextConfig(width=32, depth=3, mlp_dim=80, num_heads=2, num_kv_heads=2,
                                                   head_dim=8, query_scale=8 ** -0.5), image_size=42)
  C.write_npz(random_params(cfg, seed=1, dtype=BF16), str(tmp_path / "x.npz"))
  got = C.open_checkpoint(str(tmp_path / "x.npz")).config
  assert got.name == "custom" and got.image_size == 42 and got.num_image_tokens == 9
  assert (got.vision.width, got.vision.depth, got.vision.num_heads, got.vision.mlp_dim) == (48, 3, 3, 96)
  assert (got.text.width, got.text.depth, got.text.num_heads, got.text.num_kv_heads, got.text.head_dim,
          got.text.mlp_dim, got.text.post_norms) == (32, 3, 2, 2, 8, 80, False)


def small_vocab_config():
  return configs.PaliGemmaConfig("x", configs.VisionConfig(width=16, depth=1, mlp_dim=32, num_heads=2),
                                 configs.TextConfig(width=16, depth=1, mlp_dim=32, num_heads=2, num_kv_heads=1,
                                                    head_dim=8, vocab_size=1000, query_scale=8 ** -0.5),
                                 image_size=28)


def test_npz_as_numpy_writes_it(tmp_path):
  """np.savez_compressed, a `params/` prefix (some big_vision files) and a Fortran-ordered member all load."""
  cfg = small_vocab_config()
  p = random_params(cfg, seed=2)
  members = {f"params/{k}": v for k, v in p.items()}
  members["params/llm/layers/mlp/linear"] = np.asfortranarray(p["llm/layers/mlp/linear"])
  np.savez_compressed(tmp_path / "c.npz", **members)
  np.savez(tmp_path / "u.npz", **members)
  for name in ("c.npz", "u.npz"):
    with C.open_checkpoint(str(tmp_path / name)) as ck:
      assert _dims(ck.config) == _dims(cfg)  # pylint: disable=protected-access
      got = dict(ck.tensors(dtype=BF16))
    assert set(got) == set(p)
    for k, v in p.items():
      assert got[k].dtype == BF16 and np.array_equal(got[k], v.astype(BF16)), (name, k)


def test_pickled_member_is_refused(tmp_path):
  np.savez(tmp_path / "pickle.npz", **{"llm/evil": np.array([{"run": "code"}], dtype=object)})
  with pytest.raises(C.CorruptCheckpointError, match=r"pickle.npz is corrupt or truncated: member llm/evil.npy: "
                     r"object arrays are not allowed"):
    C.open_checkpoint(str(tmp_path / "pickle.npz"))


def test_variant_override_is_checked(ckdir):
  path = str(ckdir / "pg2.b16.npz")
  assert load(path, variant="tiny-pg2", dtype="float32").config == CFG
  with pytest.raises(C.UnexpectedKeyError, match=r"pg2.b16.npz \(as tiny-pg1\) has 2 unexpected key\(s\): "
                     r"llm/layers/post_attention_norm/scale \(shape \(2, 64\)\)"):
    load(path, variant="tiny-pg1")
  with pytest.raises(C.ShapeMismatchError, match=r"\(as pg2-3b-224\) has \d+ shape mismatch\(es\): "
                     r"img/Transformer/encoder_norm/bias: expected \(1152,\), found \(32,\)"):
    C.open_checkpoint(path, variant="pg2-3b-224")
  with pytest.raises(C.CheckpointError, match=r"unknown model variant 'pg9'"):
    load(path, variant="pg9")


def test_config_overrides(ckdir, tmp_path):
  m = load(str(ckdir / "pg2.b16.npz"), dtype="float32", final_logits_softcap=30.0, sliding_window=4096)
  assert (m.config.text.final_logits_softcap, m.config.text.sliding_window) == (30.0, 4096)
  # HF numerics come from config.json (published PG2 configs carry Gemma 2's final softcap 30).
  d = shutil.copytree(ckdir / "hf_single", tmp_path / "hf")
  cfg = json.load(open(d / "config.json"))
  cfg["text_config"]["final_logit_softcapping"] = 30.0
  json.dump(cfg, open(d / "config.json", "w"))
  assert load(str(d), dtype="float32").config.text.final_logits_softcap == 30.0
  assert load(str(d), dtype="float32", final_logits_softcap=0.0).config == CFG
  with pytest.raises(ValueError, match=r"unknown config override\(s\) \['no_such_field'\]"):
    load(str(d), no_such_field=1)


# ---------------------------------------------------------------------------------------------------------------
# Errors: each names the file/key; key and shape errors happen before anything is placed.


def live_arrays():
  return len(jax.live_arrays())


def rewrite_npz(params, path, drop=(), add=None, change=None):
  p = {k: v for k, v in params.items() if k not in drop}
  p.update(add or {})
  p.update(change or {})
  C.write_npz(p, str(path))
  return str(path)


def test_missing_key(params, tmp_path):
  path = rewrite_npz(params, tmp_path / "missing.npz", drop=["llm/final_norm/scale"])
  before = live_arrays()
  with pytest.raises(C.MissingKeyError, match=r"checkpoint .*missing.npz \(as tiny-pg2\) is missing 1 key\(s\): "
                     r"llm/final_norm/scale \(expected shape \(64,\)\)"):
    load(path)
  assert live_arrays() == before


def test_unexpected_key(params, tmp_path):
  path = rewrite_npz(params, tmp_path / "extra.npz", add={"llm/lora/a": np.zeros((3, 4), np.float32)})
  before = live_arrays()
  with pytest.raises(C.UnexpectedKeyError, match=r"extra.npz \(as tiny-pg2\) has 1 unexpected key\(s\): "
                     r"llm/lora/a \(shape \(3, 4\)\)"):
    load(path)
  assert live_arrays() == before


def test_shape_mismatch(params, tmp_path):
  path = rewrite_npz(params, tmp_path / "shape.npz", change={"llm/final_norm/scale": np.zeros(65, np.float32)})
  before = live_arrays()
  with pytest.raises(C.ShapeMismatchError, match=r"shape.npz \(as tiny-pg2\) has 1 shape mismatch\(es\): "
                     r"llm/final_norm/scale: expected \(64,\), found \(65,\)"):
    load(path)
  assert live_arrays() == before


def test_config_cannot_be_inferred(params, tmp_path):
  path = rewrite_npz(params, tmp_path / "noemb.npz", drop=["llm/embedder/input_embedding"])
  with pytest.raises(C.MissingKeyError, match=r"noemb.npz lacks llm/embedder/input_embedding: cannot infer"):
    load(path)
  # With the variant given, nothing needs inferring and the key check names the missing tensor.
  with pytest.raises(C.MissingKeyError, match=r"noemb.npz \(as tiny-pg2\) is missing 1 key\(s\): "
                     r"llm/embedder/input_embedding \(expected shape \(257152, 64\)\)"):
    load(path, variant="tiny-pg2")


def hf_copy(ckdir, tmp_path, name="hf"):
  dst = tmp_path / name
  shutil.copytree(ckdir / "hf_sharded", dst)
  return dst


def shard_with(d, key):
  index = json.load(open(d / "model.safetensors.index.json"))
  return index["weight_map"][key]


def test_hf_missing_layer_tensor_names_hf_key_and_files(ckdir, tmp_path):
  d = hf_copy(ckdir, tmp_path)
  key = "language_model.model.layers.1.mlp.down_proj.weight"
  shard = shard_with(d, key)
  t = load_file(d / shard)
  del t[key]
  save_file(t, d / shard)
  index = json.load(open(d / "model.safetensors.index.json"))
  del index["weight_map"][key]
  json.dump(index, open(d / "model.safetensors.index.json", "w"))
  before = live_arrays()
  with pytest.raises(C.MissingKeyError, match=r"is missing 1 key\(s\): llm/layers/mlp/linear \(expected shape "
                     r"\(2, 128, 64\); HF language_model.model.layers.1.mlp.down_proj.weight not found in "
                     r"model-00001-of-000\d\d.safetensors or "):
    load(str(d))
  assert live_arrays() == before


def test_hf_shape_mismatch_names_hf_key_and_shard(ckdir, tmp_path):
  d = hf_copy(ckdir, tmp_path)
  key = "language_model.model.norm.weight"
  shard = shard_with(d, key)
  t = load_file(d / shard)
  t[key] = np.zeros(65, np.float32)
  save_file(t, d / shard)
  with pytest.raises(C.ShapeMismatchError, match=r"llm/final_norm/scale: expected \(64,\), found \(65,\), "
                     rf"HF language_model.model.norm.weight in {shard}"):
    load(str(d))


def test_hf_unexpected_key_names_shard(ckdir, tmp_path):
  d = hf_copy(ckdir, tmp_path)
  t = load_file(d / "model-00001-of-00003.safetensors")
  t["language_model.model.layers.9.mlp.extra.weight"] = np.zeros((2, 2), np.float32)
  save_file(t, d / "model-00001-of-00003.safetensors")
  with pytest.raises(C.UnexpectedKeyError, match=r"language_model.model.layers.9.mlp.extra.weight \(shape \(2, 2\), "
                     r"HF language_model.model.layers.9.mlp.extra.weight in model-00001-of-00003.safetensors\)"):
    load(str(d))


def test_hf_missing_shard_and_bad_index(ckdir, tmp_path):
  d = hf_copy(ckdir, tmp_path)
  os.remove(d / "model-00002-of-00003.safetensors")
  with pytest.raises(C.CorruptCheckpointError, match=r"shard model-00002-of-00003.safetensors named in "
                     r"model.safetensors.index.json is missing"):
    load(str(d))
  (d / "model.safetensors.index.json").write_text("{not json")
  with pytest.raises(C.CorruptCheckpointError, match=r"model.safetensors.index.json is not a safetensors index"):
    load(str(d))
  (d / "config.json").write_text("{")
  with pytest.raises(C.CorruptCheckpointError, match=r"config.json is not valid JSON"):
    load(str(d))


def test_truncated_safetensors(ckdir, tmp_path, gcs):
  d = hf_copy(ckdir, tmp_path)
  shard = shard_with(d, "language_model.model.embed_tokens.weight")
  data = (d / shard).read_bytes()
  (d / shard).write_bytes(data[:len(data) // 2])
  msg = rf"is corrupt or truncated: {shard} is truncated: header declares {len(data)} bytes, file has " \
        rf"{len(data) // 2}"
  with pytest.raises(C.CorruptCheckpointError, match=msg):
    load(str(d))
  fs, bucket = gcs
  fs.put(str(d), f"{bucket}/broken/hf_truncated", recursive=True)
  with pytest.raises(C.CorruptCheckpointError, match=msg):
    load(f"gs://{bucket}/broken/hf_truncated")
  (d / shard).write_bytes(b"\x05\x00")
  with pytest.raises(C.CorruptCheckpointError, match=rf"{shard} is shorter than a safetensors header"):
    load(str(d))
  (d / shard).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}" + b"\0" * 64)
  with pytest.raises(C.CorruptCheckpointError, match=rf"{shard}: bad safetensors header"):
    load(str(d))


def test_truncated_npz(ckdir, tmp_path, gcs):
  data = (ckdir / "pg2.npz").read_bytes()
  cut = tmp_path / "cut.npz"
  cut.write_bytes(data[:len(data) * 2 // 3])
  msg = r"cut.npz is corrupt or truncated: no zip directory at the end of the file, it is probably truncated"
  with pytest.raises(C.CorruptCheckpointError, match=msg):
    load(str(cut))
  fs, bucket = gcs
  fs.put(str(cut), f"{bucket}/broken/cut.npz")
  with pytest.raises(C.CorruptCheckpointError, match=msg):
    load(f"gs://{bucket}/broken/cut.npz")


def test_npz_parts_missing_or_truncated(ckdir, tmp_path):
  parts = split_file(ckdir / "pg2.npz", tmp_path / "m.npz", 4)
  os.remove(parts[2])
  with pytest.raises(C.CorruptCheckpointError, match=r"m.npz is corrupt or truncated: split parts are not "
                     r"consecutive: found part numbers \[0, 1, 3\], missing \[2\]"):
    load(str(tmp_path / "m.npz"))
  os.remove(parts[3])  # the last part missing looks like a truncated file
  with pytest.raises(C.CorruptCheckpointError, match=r"no zip directory at the end of the file, it is probably "
                     r"truncated .* in 2 file\(s\)"):
    load(str(tmp_path / "m.npz"))


def test_corrupt_npz_data_is_caught_by_crc(ckdir, tmp_path):
  data = bytearray((ckdir / "pg2.npz").read_bytes())
  data[len(data) // 2] ^= 0xFF  # inside the embedding
  bad = tmp_path / "flip.npz"
  bad.write_bytes(bytes(data))
  with pytest.raises(C.CorruptCheckpointError, match=r"flip.npz is corrupt or truncated: CRC mismatch in member "
                     r"llm/embedder/input_embedding.npy"):
    load(str(bad), dtype="float32")
  with pytest.raises(C.CorruptCheckpointError, match=r"CRC mismatch"):  # also when casting while reading
    load(str(bad), dtype="bfloat16")


def test_not_a_checkpoint(tmp_path):
  (tmp_path / "junk.npz").write_bytes(b"this is not a zip file at all")
  with pytest.raises(C.CorruptCheckpointError, match=r"junk.npz is corrupt or truncated: not a zip/npz file "
                     r"\(first bytes b'this'\)"):
    load(str(tmp_path / "junk.npz"))
  (tmp_path / "weights.bin").write_bytes(b"\x00\x01\x02\x03")
  with pytest.raises(C.UnknownFormatError, match=r"cannot tell the format of .*weights.bin: expected a big_vision "
                     r"\.npz"):
    load(str(tmp_path / "weights.bin"))
  (tmp_path / "dir").mkdir()
  (tmp_path / "dir" / "README.md").write_text("hi")
  with pytest.raises(C.UnknownFormatError, match=r"a directory needs config.json and model.safetensors .*found "
                     r"README.md"):
    load(str(tmp_path / "dir"))
  (tmp_path / "dir" / "config.json").write_text("{}")
  (tmp_path / "dir" / "pytorch_model.bin").write_bytes(b"PK")
  with pytest.raises(C.UnknownFormatError, match=r"found README.md, config.json, pytorch_model.bin; PyTorch .bin "
                     r"weights are pickles and are not read"):
    load(str(tmp_path / "dir"))
  (tmp_path / "empty.npz").write_bytes(b"")
  with pytest.raises(C.CorruptCheckpointError, match=r"empty.npz is corrupt or truncated: not a zip/npz file"):
    load(str(tmp_path / "empty.npz"))


def test_wrong_urls(tmp_path, gcs):
  _, bucket = gcs
  for uri in (str(tmp_path / "nope.npz"), f"file://{tmp_path}/nope", f"gs://{bucket}/nope/pg2.npz",
              "gs://no-such-bucket-pgbatch/x.npz"):
    with pytest.raises(C.CheckpointNotFoundError, match=r"checkpoint not found: " + re.escape(uri)):
      load(uri)
  with pytest.raises(C.CheckpointError, match=r"cannot open checkpoint nosuchproto://x/y.npz: .*nosuchproto"):
    load("nosuchproto://x/y.npz")


# ---------------------------------------------------------------------------------------------------------------
# `pgbatch convert`.


def test_convert_round_trip_is_bit_exact(ckdir, tmp_path, capsys):
  src = ckdir / "pg2.b16.npz"
  assert main(["convert", str(src), str(tmp_path / "hf")]) == 0
  assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "back.b16.npz")]) == 0
  assert (tmp_path / "back.b16.npz").read_bytes() == src.read_bytes()
  out = capsys.readouterr().out
  assert "converted" in out and "big_vision_npz" in out and "hf_safetensors" in out
  with C.open_checkpoint(str(tmp_path / "hf")) as ck:
    assert {d for _, d in ck.names_and_shapes().values()} == {BF16} and ck.config == CFG


def test_convert_between_urls_sharded(ckdir, gcs_ckpts, tmp_path, params):
  dst = gcs_ckpts.replace("ckpt-test", "converted") + "/hf"
  assert main(["convert", f"{gcs_ckpts}/split/pg2.npz", dst, "--max-shard-bytes", str(8 << 20)]) == 0
  with C.open_checkpoint(dst) as ck:
    assert len(ck.info.files) >= 4  # config, index, 2+ shards
    for name, a in ck.tensors():
      assert np.array_equal(a, params[name]), name
  # Converting again into the same directory, unsharded this time, leaves no stale shards or index behind.
  assert main(["convert", f"{gcs_ckpts}/pg2.npz", dst]) == 0
  with C.open_checkpoint(dst) as ck:
    assert sorted(os.path.basename(p) for p, _ in ck.info.files) == ["config.json", "model.safetensors"]
  assert main(["convert", dst, f"file://{tmp_path}/again.npz"]) == 0
  assert (tmp_path / "again.npz").read_bytes() == (ckdir / "pg2.npz").read_bytes()
  # Transformers' newer key spelling converts to the same npz.
  assert main(["convert", str(ckdir / "hf_new_keys"), str(tmp_path / "new.npz")]) == 0
  assert (tmp_path / "new.npz").read_bytes() == (ckdir / "pg2.npz").read_bytes()


def test_convert_reports_errors(tmp_path, capsys):
  assert main(["convert", str(tmp_path / "missing.npz"), str(tmp_path / "out")]) == 2
  assert f"pgbatch convert: checkpoint not found: {tmp_path}/missing.npz" in capsys.readouterr().err
  assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------------
# End to end from object storage: model and tokenizer from gs://.


def test_model_and_tokenizer_from_gcs(gcs, gcs_ckpts, tokenizer_path, batch, reference):
  fs, bucket = gcs
  fs.put(tokenizer_path, f"{bucket}/ckpt-tok/paligemma.model")
  tok = T.load(f"gs://{bucket}/ckpt-tok/paligemma.model")
  model = load(f"{gcs_ckpts}/hf_sharded", dtype="float32")
  prompt = tok.encode_prompt("caption en")
  assert prompt[0] == T.BOS and prompt[-1] == tok.encode("\n")[-1] and len(prompt) <= 7
  images, tokens, prefix_len = batch
  tokens = tokens.copy()
  tokens[0, :len(prompt)] = prompt
  logits = np.asarray(model.logits(images, tokens, prefix_len))
  nxt = int(np.argmax(logits[0, len(prompt) - 1]))
  assert 0 <= nxt < T.VOCAB_SIZE and isinstance(tok.decode([nxt]), str)
  assert np.array_equal(logits[1:], reference[np.dtype(np.float32)][1:])


# ---------------------------------------------------------------------------------------------------------------
# `pgbatch bench --load`.


def test_bench_load_reports_speed_and_memory(tmp_path, capsys):
  assert main(["bench", "--load", "--load-gb", "0.1", "--stored-dtype", "float32", "--dtype", "bfloat16",
               "--repeats", "1", "--workdir", str(tmp_path)]) == 0
  row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  written = list(tmp_path.iterdir())
  assert len(written) == 1 and row["uri"] == str(written[0]) and row["format"] == C.FORMAT_NPZ
  assert 0.09e9 < row["file_bytes"] < 0.11e9 and row["params_bytes"] * 2 == pytest.approx(row["file_bytes"], 1e-3)
  assert row["stored_dtype"] == "float32" and row["dtype"] == "bfloat16" and row["tensors"] == 32
  assert row["load_seconds"] > 0 and row["mb_per_s"] > 0 and row["peak_rss_bytes"] >= row["rss_before_bytes"]
  assert row["within_bound"], row
  assert main(["bench", "--load", str(tmp_path / "nope.npz")]) == 1
  assert f"pgbatch bench: checkpoint not found: {tmp_path}/nope.npz" in capsys.readouterr().err
