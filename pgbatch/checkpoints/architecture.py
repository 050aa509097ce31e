"""The model config of a checkpoint: inferred from big_vision tensor shapes, read from a HF config.json, and
written as one (`hf_config_dict`)."""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional

from pgbatch.checkpoints.errors import CheckpointError, MissingKeyError, ShapeMismatchError, UnknownFormatError
from pgbatch.model import configs


def _dims(cfg: configs.PaliGemmaConfig):
  t = cfg.text
  return (cfg.vision, cfg.image_size, t.width, t.depth, t.mlp_dim, t.num_heads, t.num_kv_heads, t.head_dim,
          t.vocab_size, t.post_norms)


def named_variant(cfg: configs.PaliGemmaConfig) -> Optional[configs.PaliGemmaConfig]:
  return next((v for v in configs.VARIANTS.values() if _dims(v) == _dims(cfg)), None)


def config_from_shapes(shapes: Mapping[str, tuple[int, ...]], uri: str = "") -> configs.PaliGemmaConfig:
  """Architecture from big_vision tensor shapes; big_vision numerics (Gemma 2: attn softcap 50, final 0, no
  sliding window). A registered variant with the same dimensions is returned as is (e.g. 28B query scale)."""
  blk = "img/Transformer/encoderblock"
  need = ["img/embedding/kernel", "img/pos_embedding", f"{blk}/LayerNorm_0/scale", f"{blk}/MlpBlock_0/Dense_0/kernel",
          f"{blk}/MultiHeadDotProductAttention_0/query/kernel", "llm/embedder/input_embedding",
          "llm/layers/attn/q_einsum/w", "llm/layers/attn/kv_einsum/w", "llm/layers/mlp/gating_einsum"]
  missing = [k for k in need if k not in shapes]
  if missing:
    raise MissingKeyError(f"checkpoint {uri} lacks {', '.join(missing)}: cannot infer the model config "
                          "(pass variant=... or fix the checkpoint)")
  try:
    p, _, _, W = shapes["img/embedding/kernel"]
    P = shapes["img/pos_embedding"][1]
    Lv = shapes[f"{blk}/LayerNorm_0/scale"][0]
    Fv = shapes[f"{blk}/MlpBlock_0/Dense_0/kernel"][2]
    Nv = shapes[f"{blk}/MultiHeadDotProductAttention_0/query/kernel"][2]
    V, D = shapes["llm/embedder/input_embedding"]
    L, N, _, H = shapes["llm/layers/attn/q_einsum/w"]
    K = shapes["llm/layers/attn/kv_einsum/w"][2]
    F = shapes["llm/layers/mlp/gating_einsum"][3]
  except (ValueError, IndexError) as e:
    raise ShapeMismatchError(f"checkpoint {uri}: unexpected tensor rank, cannot infer the config ({e})") from None
  gen2 = "llm/layers/post_attention_norm/scale" in shapes
  cfg = configs.PaliGemmaConfig(
      "custom", configs.VisionConfig(width=W, depth=Lv, mlp_dim=Fv, num_heads=Nv, patch_size=p),
      configs.TextConfig(width=D, depth=L, mlp_dim=F, num_heads=N, num_kv_heads=K, head_dim=H, vocab_size=V,
                         query_scale=H ** -0.5, attn_logits_softcap=50.0 if gen2 else 0.0, post_norms=gen2),
      image_size=math.isqrt(P) * p)
  return named_variant(cfg) or cfg


# transformers' defaults for keys a config.json may omit (configuration_{gemma,gemma2,siglip,paligemma}.py).
_HF_TEXT_DEFAULTS = {
    "gemma": dict(hidden_size=3072, num_hidden_layers=28, intermediate_size=24576, num_attention_heads=16,
                  num_key_value_heads=16, head_dim=256, rope_theta=10000.0),
    "gemma2": dict(hidden_size=2304, num_hidden_layers=26, intermediate_size=9216, num_attention_heads=8,
                   num_key_value_heads=4, head_dim=256, rope_theta=10000.0, query_pre_attn_scalar=256,
                   attn_logit_softcapping=50.0, final_logit_softcapping=30.0, sliding_window=4096),
}


_HF_PG_TEXT = dict(model_type="gemma", hidden_size=2048, num_hidden_layers=18, intermediate_size=16384,
                   num_attention_heads=8, num_key_value_heads=1, vocab_size=257152)  # PaliGemmaConfig(text_config=None)


_HF_VISION_DEFAULTS = dict(hidden_size=768, num_hidden_layers=12, intermediate_size=3072, num_attention_heads=12,
                           patch_size=16, image_size=224)


_HF_PG_VISION = dict(hidden_size=1152, num_hidden_layers=27, intermediate_size=4096, num_attention_heads=16,
                     patch_size=14, image_size=224)  # PaliGemmaConfig(vision_config=None)


def config_from_hf(hf: Mapping[str, Any], num_patches: Optional[int] = None, vocab_rows: Optional[int] = None,
                   uri: str = "") -> configs.PaliGemmaConfig:
  """PaliGemmaConfig from a HF PaliGemma config.json (dict), with HF numerics (softcaps, sliding window as HF has
  them). `num_patches`/`vocab_rows` (from tensor shapes) override image_size/vocab, which old configs omit."""
  tc = hf.get("text_config")
  tc = dict(_HF_PG_TEXT) if tc is None else dict(tc)
  mt = tc.get("model_type", "gemma")
  if mt not in _HF_TEXT_DEFAULTS:
    raise UnknownFormatError(f"checkpoint {uri}: text model_type {mt!r} is not gemma or gemma2")
  tc = {**_HF_TEXT_DEFAULTS[mt], **{k: v for k, v in tc.items() if v is not None or k.endswith("softcapping")
                                    or k == "sliding_window"}}
  vc = hf.get("vision_config")
  vc = {**_HF_VISION_DEFAULTS, **(_HF_PG_VISION if vc is None else vc)}
  H = tc["head_dim"]
  rope = (tc.get("rope_parameters") or {}).get("rope_theta", tc.get("rope_theta", 10000.0))
  gen2 = mt == "gemma2"
  if gen2:
    sliding = tc.get("sliding_window")
    if "layer_types" in tc and "sliding_attention" not in tc["layer_types"]:
      sliding = None
    text_kw = dict(query_scale=float(tc["query_pre_attn_scalar"]) ** -0.5,
                   attn_logits_softcap=float(tc.get("attn_logit_softcapping") or 0.0),
                   final_logits_softcap=float(tc.get("final_logit_softcapping") or 0.0),
                   post_norms=True, sliding_window=sliding)
  else:
    text_kw = dict(query_scale=H ** -0.5)
  vocab = tc.get("vocab_size", hf.get("vocab_size", configs.VOCAB_SIZE)) if vocab_rows is None else vocab_rows
  vision = configs.VisionConfig(width=vc["hidden_size"], depth=vc["num_hidden_layers"], mlp_dim=vc["intermediate_size"],
                                num_heads=vc["num_attention_heads"], patch_size=vc["patch_size"])
  image_size = vc["image_size"] if num_patches is None else math.isqrt(num_patches) * vision.patch_size
  text = configs.TextConfig(
      width=tc["hidden_size"], depth=tc["num_hidden_layers"], mlp_dim=tc["intermediate_size"],
      num_heads=tc["num_attention_heads"], num_kv_heads=tc["num_key_value_heads"], head_dim=H,
      vocab_size=min(vocab, configs.VOCAB_SIZE), rope_base=float(rope), **text_kw)
  cfg = configs.PaliGemmaConfig("custom", vision, text, image_size)
  named = named_variant(cfg)
  return dataclasses.replace(cfg, name=named.name) if named else cfg


def hf_config_dict(cfg: configs.PaliGemmaConfig, dtype: str = "float32") -> dict:
  """config.json for transformers' PaliGemmaForConditionalGeneration reproducing `cfg`'s numerics."""
  t, v = cfg.text, cfg.vision
  vocab = hf_vocab_rows(t.vocab_size)
  text = dict(model_type="gemma2" if t.post_norms else "gemma", hidden_size=t.width, num_hidden_layers=t.depth,
              intermediate_size=t.mlp_dim, num_attention_heads=t.num_heads, num_key_value_heads=t.num_kv_heads,
              head_dim=t.head_dim, vocab_size=vocab, rope_theta=t.rope_base, rms_norm_eps=1e-6,
              hidden_activation="gelu_pytorch_tanh", hidden_act="gelu_pytorch_tanh", max_position_embeddings=8192,
              num_image_tokens=cfg.num_image_tokens, torch_dtype=dtype)
  if t.post_norms:
    scalar = t.query_scale ** -2
    if abs(scalar - round(scalar)) > 1e-3:
      raise CheckpointError(f"query_scale {t.query_scale} is not rsqrt of an integer; HF cannot express it")
    text.update(query_pre_attn_scalar=int(round(scalar)),
                attn_logit_softcapping=t.attn_logits_softcap or None,
                final_logit_softcapping=t.final_logits_softcap or None,
                sliding_window=t.sliding_window or 8192,
                layer_types=[("sliding_attention" if t.sliding_window and i % 2 == 0 else "full_attention")
                             for i in range(t.depth)])
  elif not math.isclose(t.query_scale, t.head_dim ** -0.5) or t.attn_logits_softcap or t.final_logits_softcap:
    raise CheckpointError("HF Gemma 1 cannot express a query scale other than head_dim**-0.5 or softcaps")
  vision = dict(model_type="siglip_vision_model", hidden_size=v.width, num_hidden_layers=v.depth,
                intermediate_size=v.mlp_dim, num_attention_heads=v.num_heads, patch_size=v.patch_size,
                image_size=cfg.image_size, projection_dim=t.width, num_image_tokens=cfg.num_image_tokens,
                vision_use_head=False, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
  return dict(architectures=["PaliGemmaForConditionalGeneration"], model_type="paligemma",
              image_token_index=t.vocab_size, vocab_size=vocab, projection_dim=t.width, hidden_size=t.width,
              pad_token_id=0, bos_token_id=2, eos_token_id=1, tie_word_embeddings=True, torch_dtype=dtype,
              text_config=text, vision_config=vision, pgbatch_variant=cfg.name)


def hf_vocab_rows(v: int) -> int:
  """HF converters: resize_token_embeddings(vocab + 2, pad_to_multiple_of=64) → 257216 for 257152."""
  return -(-(v + 2) // 64) * 64

