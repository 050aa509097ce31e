"""LoRA adapters merged at load: a PEFT adapter written by `peft` on a tiny transformers PaliGemma gives the
logits of transformers' merged model; big_vision npz deltas; every mismatch fails at load naming the tensor."""
import json
import shutil

import jax
import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model

import pgbatch.model
from pgbatch import adapters as A
from pgbatch import checkpoints as C
from pgbatch.model import make_mesh
from tests.test_model import IMAGE_TOKEN, NUM_IMAGE_TOKENS, build_hf

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",  # Gemma
           "fc1", "fc2", "out_proj", "linear", "embed_tokens"]                          # SigLIP, projector, embedding


def lora(generation: int):
  """(base HF dir, adapter dir, merged HF model) for one generation; PEFT options differ per generation."""
  hf = build_hf(generation, seed=10 + generation)
  options = dict(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
  if generation == 2:  # per-module ranks and alphas, rank-stabilized scaling
    options.update(r=3, lora_alpha=5, use_rslora=True, rank_pattern={"down_proj": 2, r"layers\.1\.self_attn\.q_proj": 5},
                   alpha_pattern={"o_proj": 11})
  return hf, options


@pytest.fixture(scope="module", params=[1, 2], ids=["pg1", "pg2"])
def peft_case(request, tmp_path_factory):
  root = tmp_path_factory.mktemp(f"lora_pg{request.param}")
  hf, options = lora(request.param)
  hf.save_pretrained(root / "base")
  torch.manual_seed(request.param)
  pm = get_peft_model(hf, LoraConfig(**options))
  with torch.no_grad():  # LoRA factors as large as a real fine-tune's effect, so a wrong merge shows
    for name, p in pm.named_parameters():
      if "lora_" in name:
        p.copy_(torch.randn_like(p) * 0.3)
  pm.save_pretrained(root / "adapter")
  merged = pm.merge_and_unload().eval()
  return root, merged


def reference_logits(hf, images, tokens, prefix_len):
  n = len(tokens)
  ids = np.concatenate([np.full((n, NUM_IMAGE_TOKENS), IMAGE_TOKEN), tokens], axis=1)
  token_type = np.concatenate([np.zeros((n, NUM_IMAGE_TOKENS)), np.arange(tokens.shape[1])[None] >= prefix_len[:, None]], 1)
  with torch.no_grad():
    return hf(input_ids=torch.tensor(ids), pixel_values=torch.tensor(images.transpose(0, 3, 1, 2)),
              token_type_ids=torch.tensor(token_type, dtype=torch.long)).logits.numpy()[:, NUM_IMAGE_TOKENS:, :257152]


@pytest.fixture(scope="module")
def batch():
  rng = np.random.default_rng(0)
  images = rng.uniform(-1, 1, (4, 56, 56, 3)).astype(np.float32)
  tokens = rng.integers(3, 257152, (4, 9)).astype(np.int32)
  tokens[:, 0] = 2
  return images, tokens, np.array([6, 4, 9, 1], np.int32)


def rel(a, b):
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("mesh_shape", [None, (2, 2)], ids=["one-device", "mesh2x2"])
def test_peft_lora_logits_equal_transformers_merged(peft_case, batch, mesh_shape):
  root, merged = peft_case
  images, tokens, prefix_len = batch
  mesh = make_mesh(*mesh_shape) if mesh_shape else None
  model = pgbatch.model.load(str(root / "base"), dtype="float32", mesh=mesh, adapters=[str(root / "adapter")])
  with jax.default_matmul_precision("highest"):
    got = np.asarray(model.logits(images, tokens, prefix_len))
    base = np.asarray(pgbatch.model.load(str(root / "base"), dtype="float32").logits(images, tokens, prefix_len))
  ref = reference_logits(merged, images, tokens, prefix_len)
  assert rel(got, ref) <= 1e-4, rel(got, ref)
  assert rel(base, ref) > 1e-2  # the adapter changes the model: a no-op merge would fail above
  (info,) = model.adapters
  assert info.uri == str(root / "adapter") and info.format == "peft_lora" and info.digest.startswith("sha256:")
  if mesh is not None:  # merged on the mesh: every param keeps its sharding
    q = model.params["llm"]["layers"]["attn"]["q_einsum"]["w"]
    assert q.sharding.spec[1] == "model"


def test_touched_params_and_skipped_modules(peft_case):
  root, _ = peft_case
  cfg = C.open_checkpoint(str(root / "base")).config
  adapter = A.open_adapter(str(root / "adapter"), cfg)
  assert "llm/embedder/input_embedding" in adapter.layers
  assert set(adapter.layers["llm/layers/attn/kv_einsum/w"]) == {0, 1}   # k and v of both layers, one delta each
  assert "img/head/kernel" in adapter.layers and "img/Transformer/encoderblock/MlpBlock_0/Dense_1/kernel" in adapter.layers
  assert all("vision_tower.head" in m for m in adapter.skipped) and adapter.skipped  # SigLIP's unused MAP head


def test_big_vision_npz_deltas(peft_case, batch, tmp_path):
  """Deltas = (transformers-merged weights) - (base weights) in big_vision layout: base + deltas = merged."""
  root, merged = peft_case
  merged.save_pretrained(tmp_path / "merged")
  images, tokens, prefix_len = batch
  with C.open_checkpoint(str(root / "base")) as b, C.open_checkpoint(str(tmp_path / "merged")) as m:
    base, full = dict(b.tensors(dtype=np.float32)), dict(m.tensors(dtype=np.float32))
  deltas = {k: full[k] - base[k] for k in base if not np.array_equal(full[k], base[k])}
  assert "llm/layers/mlp/gating_einsum" in deltas and "img/embedding/kernel" not in deltas
  C.write_npz(deltas, str(tmp_path / "deltas.npz"))
  model = pgbatch.model.load(str(root / "base"), dtype="float32", adapters=[str(tmp_path / "deltas.npz")])
  with jax.default_matmul_precision("highest"):
    got = np.asarray(model.logits(images, tokens, prefix_len))
  assert rel(got, reference_logits(merged, images, tokens, prefix_len)) <= 1e-4
  assert model.adapters[0].format == "big_vision_npz"


def edit_config(src, dst, **changes):
  shutil.copytree(src, dst)
  cfg = json.loads((dst / A.PEFT_CONFIG).read_text())
  cfg.update(changes)
  (dst / A.PEFT_CONFIG).write_text(json.dumps(cfg))
  return str(dst)


def test_mismatches_fail_at_load_naming_the_tensor(peft_case, tmp_path):
  root, _ = peft_case
  base = str(root / "base")
  cfg = C.open_checkpoint(base).config
  generation = 2 if cfg.text.post_norms else 1
  cases = []
  # rank in the config disagrees with the factors
  cases.append((edit_config(root / "adapter", tmp_path / "rank", r=7, rank_pattern={}),
                r"tensor base_model\.model\..*lora_(embedding_)?[AB](\.weight)? has rank \d, but adapter_config\.json gives r=7"))
  # an adapter trained for another architecture (other generation: other kv heads / mlp shapes)
  other_root = tmp_path / "other"
  hf, options = lora(3 - generation)
  pm = get_peft_model(hf, LoraConfig(**{**options, "target_modules": ["k_proj"], "rank_pattern": {}, "alpha_pattern": {}}))
  pm.save_pretrained(other_root)
  if generation == 1:  # pg2 k_proj has 2 kv heads: [32, 64]; pg1 has 1: [16, 64]
    cases.append((str(other_root), r"lora_A\.weight .* and .*k_proj\.lora_B\.weight \(32, 3\) give a delta of shape "
                                   r"\(32, 64\) for .*k_proj\.weight, which has shape \(16, 64\)"))
  else:
    cases.append((str(other_root), r"k_proj\.lora_B\.weight \(16, 4\) give a delta of shape \(16, 64\) .* has shape "
                                   r"\(32, 64\)"))
  # npz: a delta of the wrong shape, and a name that is no parameter
  C.write_npz({"llm/final_norm/scale": np.zeros(3, np.float32)}, str(tmp_path / "shape.npz"))
  cases.append((str(tmp_path / "shape.npz"), r"tensor llm/final_norm/scale has shape \(3,\), the parameter has \(64,\)"))
  C.write_npz({"llm/nope": np.zeros(3, np.float32)}, str(tmp_path / "name.npz"))
  cases.append((str(tmp_path / "name.npz"), r"tensor llm/nope is not a parameter of"))
  cases.append((str(tmp_path / "missing"), r"adapter not found: .*missing"))
  (tmp_path / "empty").mkdir()
  cases.append((str(tmp_path / "empty"), r"adapter_config\.json not found"))
  dora = edit_config(root / "adapter", tmp_path / "dora", use_dora=True)
  cases.append((dora, r"use_dora: DoRA adapters are not supported"))
  for uri, pattern in cases:
    with pytest.raises(A.AdapterError, match=pattern):
      pgbatch.model.load(base, dtype="float32", adapters=[str(root / "adapter"), uri])


def test_digest_follows_the_content(peft_case, tmp_path):
  root, _ = peft_case
  cfg = C.open_checkpoint(str(root / "base")).config
  copy = tmp_path / "copy"
  shutil.copytree(root / "adapter", copy)
  d1 = A.open_adapter(str(root / "adapter"), cfg).info.digest
  assert A.open_adapter(str(copy), cfg).info.digest == d1   # same bytes elsewhere: same digest
  edit_config(root / "adapter", tmp_path / "alpha", lora_alpha=9)
  assert A.open_adapter(str(tmp_path / "alpha"), cfg).info.digest != d1
