"""Named PaliGemma variants and their dimensions.

A `PaliGemmaConfig` is plain data: the SigLIP encoder (`VisionConfig`), the Gemma decoder (`TextConfig`) and
the image resolution. Every published size is registered (`pg1-3b-{224,448,896}`, `pg2-{3b,10b,28b}-{224,448,896}`)
plus `tiny-*` variants for tests. Numbers are from big_vision (`vit.py::decode_variant`, `gemma.py::get_config`).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

VOCAB_SIZE = 257_152  # 256000 Gemma pieces + 1024 <locXXXX> + 128 <segXXX>


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """SigLIP ViT (pool_type="none"); `head` projects to the decoder width."""
  width: int = 1152
  depth: int = 27
  mlp_dim: int = 4304
  num_heads: int = 16
  patch_size: int = 14
  unroll: bool = False                    # compile the layer loop unrolled (cost analysis counts a loop body once)

  @property
  def head_dim(self) -> int:
    return self.width // self.num_heads


@dataclasses.dataclass(frozen=True)
class TextConfig:
  """Gemma 1 / Gemma 2 decoder."""
  width: int = 2048
  depth: int = 18
  mlp_dim: int = 16384
  num_heads: int = 8
  num_kv_heads: int = 1
  head_dim: int = 256
  vocab_size: int = VOCAB_SIZE
  query_scale: float = 256 ** -0.5        # applied to q after RoPE
  attn_logits_softcap: float = 0.0        # 0 = off; Gemma 2: 50
  final_logits_softcap: float = 0.0       # 0 = off (big_vision); HF PG2 configs: 30
  post_norms: bool = False                # Gemma 2: post-attention and post-ffw RMSNorms
  sliding_window: Optional[int] = None    # Gemma 2 local attention on even layers (HF); None = off (big_vision)
  rope_base: float = 10_000.0
  unroll: bool = False                    # compile the layer loop unrolled (cost analysis counts a loop body once)


@dataclasses.dataclass(frozen=True)
class PaliGemmaConfig:
  name: str
  vision: VisionConfig
  text: TextConfig
  image_size: int = 224

  @property
  def num_image_tokens(self) -> int:
    return (self.image_size // self.vision.patch_size) ** 2

  @property
  def generation(self) -> int:
    return 2 if self.text.post_norms else 1

  def replace(self, **text_overrides) -> "PaliGemmaConfig":
    return dataclasses.replace(self, text=dataclasses.replace(self.text, **text_overrides))

  def with_depth(self, depth: int, unroll: bool = True) -> "PaliGemmaConfig":
    """The same model with `depth` layers in both towers (cost extrapolation by depth)."""
    return dataclasses.replace(self, vision=dataclasses.replace(self.vision, depth=depth, unroll=unroll),
                               text=dataclasses.replace(self.text, depth=depth, unroll=unroll))


def _gemma(width, depth, mlp_dim, num_heads, num_kv_heads, head_dim, gen2, query_scale=None):
  return TextConfig(
      width=width, depth=depth, mlp_dim=mlp_dim, num_heads=num_heads, num_kv_heads=num_kv_heads,
      head_dim=head_dim, query_scale=query_scale or head_dim ** -0.5,
      attn_logits_softcap=50.0 if gen2 else 0.0, post_norms=gen2)


_TEXT = {
    "pg1-3b": _gemma(2048, 18, 16384, 8, 1, 256, gen2=False),
    "pg2-3b": _gemma(2304, 26, 9216, 8, 4, 256, gen2=True),
    "pg2-10b": _gemma(3584, 42, 14336, 16, 8, 256, gen2=True),
    # 27B scales queries by (width // heads) ** -0.5 = 144 ** -0.5, not head_dim ** -0.5.
    "pg2-28b": _gemma(4608, 46, 36864, 32, 16, 128, gen2=True, query_scale=(4608 // 32) ** -0.5),
}

VARIANTS: dict[str, PaliGemmaConfig] = {
    f"{family}-{res}": PaliGemmaConfig(f"{family}-{res}", VisionConfig(), text, res)
    for family, text in _TEXT.items() for res in (224, 448, 896)
}

# Tiny variants for tests and the demo: same code paths, seconds to compile on a CPU.
_TINY_VISION = VisionConfig(width=32, depth=2, mlp_dim=64, num_heads=4, patch_size=14)
VARIANTS["tiny-pg1"] = PaliGemmaConfig(
    "tiny-pg1", _TINY_VISION, TextConfig(width=64, depth=2, mlp_dim=128, num_heads=4, num_kv_heads=1,
                                         head_dim=16, query_scale=16 ** -0.5), image_size=56)
VARIANTS["tiny-pg2"] = PaliGemmaConfig(
    "tiny-pg2", _TINY_VISION, TextConfig(width=64, depth=2, mlp_dim=128, num_heads=4, num_kv_heads=2,
                                         head_dim=16, query_scale=16 ** -0.5, attn_logits_softcap=50.0,
                                         post_norms=True), image_size=56)


def get(name: str) -> PaliGemmaConfig:
  try:
    return VARIANTS[name]
  except KeyError:
    raise ValueError(f"unknown model variant {name!r}; known: {', '.join(VARIANTS)}") from None


def param_shapes(cfg: PaliGemmaConfig) -> dict[str, tuple[int, ...]]:
  """Flat `/`-joined big_vision parameter names → shapes. This is the one param-tree contract of pgbatch.

  Letters: L depth, N heads, K kv heads, H head_dim, D width, F mlp_dim, P patches, V vocab.
  """
  v, t = cfg.vision, cfg.text
  W, Lv, Fv, Nv, Hv, p = v.width, v.depth, v.mlp_dim, v.num_heads, v.head_dim, v.patch_size
  L, N, K, H, D, F = t.depth, t.num_heads, t.num_kv_heads, t.head_dim, t.width, t.mlp_dim
  blk = "img/Transformer/encoderblock"
  mha = f"{blk}/MultiHeadDotProductAttention_0"
  s = {
      "img/embedding/kernel": (p, p, 3, W), "img/embedding/bias": (W,),
      "img/pos_embedding": (1, cfg.num_image_tokens, W),
      f"{blk}/LayerNorm_0/scale": (Lv, W), f"{blk}/LayerNorm_0/bias": (Lv, W),
      f"{blk}/LayerNorm_1/scale": (Lv, W), f"{blk}/LayerNorm_1/bias": (Lv, W),
      f"{blk}/MlpBlock_0/Dense_0/kernel": (Lv, W, Fv), f"{blk}/MlpBlock_0/Dense_0/bias": (Lv, Fv),
      f"{blk}/MlpBlock_0/Dense_1/kernel": (Lv, Fv, W), f"{blk}/MlpBlock_0/Dense_1/bias": (Lv, W),
      f"{mha}/out/kernel": (Lv, Nv, Hv, W), f"{mha}/out/bias": (Lv, W),
      "img/Transformer/encoder_norm/scale": (W,), "img/Transformer/encoder_norm/bias": (W,),
      "img/head/kernel": (W, D), "img/head/bias": (D,),
      "llm/embedder/input_embedding": (t.vocab_size, D),
      "llm/layers/attn/q_einsum/w": (L, N, D, H),
      "llm/layers/attn/kv_einsum/w": (L, 2, K, D, H),
      "llm/layers/attn/attn_vec_einsum/w": (L, N, H, D),
      "llm/layers/mlp/gating_einsum": (L, 2, D, F),
      "llm/layers/mlp/linear": (L, F, D),
      "llm/layers/pre_attention_norm/scale": (L, D),
      "llm/layers/pre_ffw_norm/scale": (L, D),
      "llm/final_norm/scale": (D,),
  }
  for x in ("query", "key", "value"):
    s[f"{mha}/{x}/kernel"] = (Lv, W, Nv, Hv)
    s[f"{mha}/{x}/bias"] = (Lv, Nv, Hv)
  if t.post_norms:
    s["llm/layers/post_attention_norm/scale"] = (L, D)
    s["llm/layers/post_ffw_norm/scale"] = (L, D)
  return dict(sorted(s.items()))


def num_params(cfg: PaliGemmaConfig) -> int:
  n = 0
  for shape in param_shapes(cfg).values():
    size = 1
    for d in shape:
      size *= d
    n += size
  return n
