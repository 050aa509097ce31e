"""PaliGemma 1 and 2 match Hugging Face transformers on the same random weights (fp32, eager attention).

Tiny models are built with transformers, every parameter randomized (non-zero norm scales and biases),
saved with `save_pretrained`, and loaded through `pgbatch.model.load`.
"""
import jax
import numpy as np
import pytest
import torch
from transformers import PaliGemmaConfig as HFConfig
from transformers import PaliGemmaForConditionalGeneration

import pgbatch.model
from pgbatch.engine import Engine, batch_buckets
from pgbatch.model import configs, make_mesh

IMAGE_TOKEN = 257152
NUM_IMAGE_TOKENS = 16  # (56 / 14) ** 2
PROMPTS = [[2, 651, 7311, 108], [2, 9, 108], [2, 4009, 1010, 2020, 3030, 108], [2, 77, 88, 108],
           [2, 5, 108], [2, 123, 456, 789, 108], [2, 1000, 108], [2, 31, 32, 33, 34, 35, 36, 108]]
MAX_NEW = 10


def hf_config(generation: int) -> HFConfig:
  text = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
              num_key_value_heads=1, head_dim=16, vocab_size=257216, model_type="gemma")
  if generation == 2:
    text.update(model_type="gemma2", num_key_value_heads=2, query_pre_attn_scalar=16,
                attn_logit_softcapping=50.0, final_logit_softcapping=30.0, sliding_window=4096)
  vision = dict(hidden_size=32, num_hidden_layers=2, intermediate_size=64, num_attention_heads=4,
                patch_size=14, image_size=56, projection_dim=64)
  return HFConfig(text_config=text, vision_config=vision, projection_dim=64,
                  image_token_index=IMAGE_TOKEN, vocab_size=257216)


def build_hf(generation: int, seed: int):
  torch.manual_seed(seed)
  model = PaliGemmaForConditionalGeneration(hf_config(generation)).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim == 1:      # norm scales and biases: random, non-zero
        p.copy_(torch.randn_like(p) * 0.2)
      elif "embed" in name:
        p.copy_(torch.randn_like(p) * 0.05)
      else:
        p.copy_(torch.randn_like(p) * p.shape[-1] ** -0.5)
  model.config._attn_implementation = "eager"
  for sub in (model.config.text_config, model.config.vision_config):
    sub._attn_implementation = "eager"
  return model


@pytest.fixture(scope="module", params=[1, 2], ids=["pg1", "pg2"])
def pair(request, tmp_path_factory):
  """(transformers model, pgbatch fp32 model, checkpoint dir)."""
  hf = build_hf(request.param, seed=request.param)
  path = tmp_path_factory.mktemp(f"hf_pg{request.param}")
  hf.save_pretrained(path)
  ours = pgbatch.model.load(str(path), dtype="float32")
  return hf, ours, path


@pytest.fixture(scope="module")
def images():
  return np.random.default_rng(0).uniform(-1, 1, (len(PROMPTS), 56, 56, 3)).astype(np.float32)


def hf_generate(hf, image, prompt):
  ids = torch.tensor([[IMAGE_TOKEN] * NUM_IMAGE_TOKENS + prompt])
  with torch.no_grad():
    out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), token_type_ids=torch.zeros_like(ids),
                      pixel_values=torch.tensor(image[None].transpose(0, 3, 1, 2)),
                      max_new_tokens=MAX_NEW, do_sample=False)
  return out[0, ids.shape[1]:].tolist()


def test_architecture_read_from_config(pair):
  hf, ours, _ = pair
  t = ours.config.text
  assert (t.width, t.depth, t.num_heads, t.head_dim) == (64, 2, 4, 16)
  assert t.post_norms == (hf.config.text_config.model_type == "gemma2")
  assert ours.config.image_size == 56 and ours.config.num_image_tokens == NUM_IMAGE_TOKENS


def test_logits_match_transformers(pair, images):
  hf, ours, _ = pair
  rng = np.random.default_rng(1)
  tokens = rng.integers(3, 256000, (4, 9)).astype(np.int32)
  tokens[:, 0] = 2
  prefix_len = np.array([6, 4, 9, 1], np.int32)  # rows differ in how much text is in the prefix
  with jax.default_matmul_precision("highest"):
    got = np.asarray(ours.logits(images[:4], tokens, prefix_len))
  ids = np.concatenate([np.full((4, NUM_IMAGE_TOKENS), IMAGE_TOKEN), tokens], axis=1)
  token_type = np.concatenate([np.zeros((4, NUM_IMAGE_TOKENS)), np.arange(9)[None] >= prefix_len[:, None]], 1)
  with torch.no_grad():
    ref = hf(input_ids=torch.tensor(ids), pixel_values=torch.tensor(images[:4].transpose(0, 3, 1, 2)),
             token_type_ids=torch.tensor(token_type, dtype=torch.long),
             labels=torch.tensor(ids)).logits.numpy()[:, NUM_IMAGE_TOKENS:, :257152]
  rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
  assert rel <= 1e-4, rel
  # The prefix mask matters: the same tokens with a causal prefix give different logits.
  with jax.default_matmul_precision("highest"):
    causal = np.asarray(ours.logits(images[:4], tokens, np.ones(4, np.int32)))
  assert np.linalg.norm(causal[0] - ref[0]) / np.linalg.norm(ref[0]) > 1e-3


def test_greedy_tokens_match_transformers_generate(pair, images):
  hf, ours, _ = pair
  with jax.default_matmul_precision("highest"):
    got = ours.generate(images, PROMPTS, MAX_NEW)
  for row, (image, prompt) in enumerate(zip(images, PROMPTS)):
    assert got[row] == hf_generate(hf, image, prompt), f"row {row}"
  # Not a degenerate test: rows produce different, varied continuations.
  assert len({tuple(r) for r in got}) > 1
  assert len({t for r in got for t in r}) > 3


def test_decode_steps_match_the_full_pass(pair, images):
  # Each step's logits, from the prefix's keys plus the new-token cache written in place, equal the full pass over
  # prompt + new tokens (prefix-LM mask): the cache holds exactly what the full pass computes.
  from pgbatch.model import pad_prompts, paligemma
  _, ours, _ = pair
  cfg, n, prompts = ours.config, 5, PROMPTS[:4]
  prefill = jax.jit(paligemma.prefill, static_argnames=("cfg", "max_new_tokens"))
  step = jax.jit(paligemma.decode_step, static_argnames="cfg")
  with jax.default_matmul_precision("highest"):
    zimg = ours.encode_images(images[:4])
    tokens, lengths, _ = pad_prompts(prompts, 4)
    logits, state = prefill(ours.params, zimg, tokens, lengths, cfg=cfg, max_new_tokens=n)
    steps = [np.asarray(logits)]
    for i in range(1, n):
      logits, state = step(ours.params, np.argmax(steps[-1], -1).astype(np.int32), np.int32(i), state, cfg=cfg)
      steps.append(np.asarray(logits))
    new = np.argmax(np.stack(steps, 1), -1)                                    # [B, n]
    full_tokens = np.zeros((4, 8 + n), np.int32)
    for b, p in enumerate(prompts):
      full_tokens[b, :len(p) + n] = p + new[b].tolist()
    full = np.asarray(ours.logits(images[:4], full_tokens, lengths))
  for b, p in enumerate(prompts):
    want = full[b, len(p) - 1:len(p) - 1 + n]
    got = np.stack(steps, 1)[b]
    assert np.linalg.norm(got - want) / np.linalg.norm(want) <= 1e-5, b


def test_bfloat16_agrees_with_float32_on_most_rows(pair, images):
  _, ours, path = pair
  bf16 = pgbatch.model.load(str(path), dtype="bfloat16")
  assert str(bf16.dtype) == "bfloat16"
  ref = ours.generate(images, PROMPTS, MAX_NEW)
  got = bf16.generate(images, PROMPTS, MAX_NEW)
  same = sum(a == b for a, b in zip(ref, got))
  first_token_same = sum(a[0] == b[0] for a, b in zip(ref, got))
  # Measured on this test's models: 8/8 rows identical for pg1 and 8/8 for pg2 (CPU, XLA).
  assert first_token_same == len(PROMPTS)
  assert same >= 6, f"{same}/{len(PROMPTS)} rows identical"


@pytest.mark.parametrize("data,model", [(8, 1), (4, 2), (2, 4)])
def test_mesh_gives_same_tokens(pair, images, data, model):
  _, ours, path = pair
  sharded = pgbatch.model.load(str(path), dtype="float32", mesh=make_mesh(data, model))
  q = sharded.params["llm"]["layers"]["attn"]["q_einsum"]["w"]
  assert q.sharding.spec[1] == ("model" if model > 1 else None)
  assert sharded.generate(images, PROMPTS, MAX_NEW) == ours.generate(images, PROMPTS, MAX_NEW)


def test_engine_encodes_once_and_matches_generate(pair, images):
  _, ours, _ = pair
  engine = Engine(ours, batch_size=4)
  u8 = np.round((images + 1) * 127.5).astype(np.uint8)
  as_float = u8.astype(np.float32) * (2 / 255) - 1
  out = engine.annotate(u8[:3], {"a": PROMPTS[:3], "b": PROMPTS[3:6]}, {"a": 6, "b": 4})
  assert out["a"] == ours.generate(as_float[:3], PROMPTS[:3], 6)
  assert out["b"] == ours.generate(as_float[:3], PROMPTS[3:6], 4)
  assert all(len(r) <= 4 for r in out["b"])
  # More images than the batch size are split into batches with the same result.
  big = engine.annotate(u8, {"a": PROMPTS}, {"a": 6})
  assert big["a"] == ours.generate(as_float, PROMPTS, 6)


def test_engine_is_thread_safe(pair, images):
  # Annotate actors on accelerators run two batches at once (placement.concurrent_batches): same tokens, stats add up.
  from concurrent.futures import ThreadPoolExecutor
  _, ours, _ = pair
  engine = Engine(ours, batch_size=4)
  u8 = np.round((images + 1) * 127.5).astype(np.uint8)
  calls = [(u8[i:i + 2], {"a": PROMPTS[i:i + 2]}) for i in range(0, 6, 2)] * 2
  serial = [engine.annotate(x, p, {"a": 5}) for x, p in calls]
  with ThreadPoolExecutor(2) as pool:
    threaded = list(pool.map(lambda c: engine.annotate(c[0], c[1], {"a": 5}), calls))
  assert threaded == serial
  assert engine.stats["batches"] == 2 * len(calls) and engine.stats["images"] == 2 * 12


def test_batch_buckets():
  # Multiples of 32 (and of the data axis) up to the batch size: a partial batch wastes fewer than 32 rows.
  assert batch_buckets(256) == [32, 64, 96, 128, 160, 192, 224, 256]
  assert batch_buckets(64) == [32, 64]
  assert batch_buckets(48, 4) == [32, 48]
  assert batch_buckets(100, 8) == [32, 64, 96, 104]   # the last rounded up to the data axis
  assert batch_buckets(96, 3) == [96]                 # lcm(32, 3) = 96
  assert batch_buckets(8) == [8] and batch_buckets(1) == [1]
  assert batch_buckets(1024) == [128, 256, 384, 512, 640, 768, 896, 1024]   # at most 8 programs per task
  assert batch_buckets(300, 8) == [64, 128, 192, 256, 304]


def test_engine_warm_up_compiles_every_bucket_and_nothing_after(pair, images):
  # Batch 36: buckets 32 and 36. After warm-up no batch size compiles anything (counted via jax.monitoring).
  _, ours, _ = pair
  engine = Engine(ours, batch_size=36)
  u8 = np.round((images + 1) * 127.5).astype(np.uint8)
  n = engine.warm_up({"a": PROMPTS[0], "b": PROMPTS[1]}, {"a": 3, "b": 2})
  assert n == engine.compile_counts()["warm_up"] >= 2 * 3   # per bucket: SigLIP + one program per task
  assert set(engine.programs) == {("encode", 32), ("encode", 36), ("generate", 32, 8, 3), ("generate", 32, 8, 2),
                                  ("generate", 36, 8, 3), ("generate", 36, 8, 2)}
  many = np.concatenate([u8] * 5)   # 40 images: 36 + a partial batch of 4
  for rows in (many[:3], many[:33], many):
    out = engine.annotate(rows, {"a": PROMPTS[:1] * len(rows), "b": PROMPTS[1:2] * len(rows)}, {"a": 3, "b": 2})
    assert len(out["a"]) == len(rows)
  assert engine.compile_counts()["mid_job"] == 0
  assert engine.take_compile_counts() == (n, 0) and engine.take_compile_counts() == (0, 0)
  # A prompt in a longer bucket than the warmed-up one is a (counted) mid-job compile.
  engine.annotate(u8[:1], {"a": [PROMPTS[0] + [5] * 20]}, {"a": 3})
  assert engine.compile_counts()["mid_job"] >= 1


def test_variant_registry_sizes(capsys):
  from pgbatch.cli import main
  assert main(["models"]) == 0
  out = capsys.readouterr().out
  assert "pg1-3b-224" in out and "2.92B" in out.split("pg1-3b-224")[1].splitlines()[0]
  expected = {"pg2-3b-224": 3.03, "pg2-10b-224": 9.66, "pg2-28b-224": 27.65}
  for name, billions in expected.items():
    assert round(configs.num_params(configs.get(name)) / 1e9, 2) == billions
  assert {f"pg2-{s}-{r}" for s in ("3b", "10b", "28b") for r in (224, 448, 896)} <= set(configs.VARIANTS)
