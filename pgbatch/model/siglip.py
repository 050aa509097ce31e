"""SigLIP So400m/14 image encoder (big_vision `vit.py`, pool_type="none") plus the multimodal projector.

Params are the plain tree under big_vision's `img/` prefix, layers stacked on a leading depth axis.

Einsum letters: B batch, P patches (image tokens), W width, N heads, H head_dim, F mlp_dim, D decoder width.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pgbatch.model.configs import VisionConfig


def layer_norm(x, p, eps: float = 1e-6):
  """LayerNorm over the last axis, computed in float32. x [..., W]."""
  x32 = x.astype(jnp.float32)
  mean = x32.mean(-1, keepdims=True)
  var = jnp.square(x32 - mean).mean(-1, keepdims=True)
  y = (x32 - mean) * jax.lax.rsqrt(var + eps)
  return (y * p["scale"].astype(jnp.float32) + p["bias"].astype(jnp.float32)).astype(x.dtype)


def _attention(p, x, num_heads: int):
  """Non-causal multi-head self-attention with biases. x [B, P, W] -> [B, P, W]."""
  q = jnp.einsum("BPW,WNH->BPNH", x, p["query"]["kernel"]) + p["query"]["bias"]
  k = jnp.einsum("BPW,WNH->BPNH", x, p["key"]["kernel"]) + p["key"]["bias"]
  v = jnp.einsum("BPW,WNH->BPNH", x, p["value"]["kernel"]) + p["value"]["bias"]
  o = jax.nn.dot_product_attention(q, k, v, scale=q.shape[-1] ** -0.5)  # fused where the backend has it
  return jnp.einsum("BPNH,NHW->BPW", o, p["out"]["kernel"]) + p["out"]["bias"]


def _block(x, p, num_heads: int):
  """Pre-LN encoder block. x [B, P, W]."""
  x = x + _attention(p["MultiHeadDotProductAttention_0"], layer_norm(x, p["LayerNorm_0"]), num_heads)
  mlp = p["MlpBlock_0"]
  h = layer_norm(x, p["LayerNorm_1"])
  h = jax.nn.gelu(h @ mlp["Dense_0"]["kernel"] + mlp["Dense_0"]["bias"], approximate=True)
  return x + (h @ mlp["Dense_1"]["kernel"] + mlp["Dense_1"]["bias"])


def encode(params, images, cfg: VisionConfig):
  """Images float [B, R, R, 3] in [-1, 1] -> projected image tokens [B, P, D] (P = (R/14)^2)."""
  dtype = params["embedding"]["kernel"].dtype
  x = jax.lax.conv_general_dilated(
      images.astype(dtype), params["embedding"]["kernel"], (cfg.patch_size,) * 2, "VALID",
      dimension_numbers=("NHWC", "HWIO", "NHWC")) + params["embedding"]["bias"]
  b, h, w, c = x.shape
  x = x.reshape(b, h * w, c) + params["pos_embedding"].astype(dtype)

  def body(x, layer_params):
    return _block(x, layer_params, cfg.num_heads), None

  x, _ = jax.lax.scan(body, x, params["Transformer"]["encoderblock"], unroll=cfg.unroll)
  x = layer_norm(x, params["Transformer"]["encoder_norm"])
  return x @ params["head"]["kernel"] + params["head"]["bias"]
