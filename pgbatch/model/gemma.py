"""Gemma 1 / Gemma 2 decoder (big_vision `ppp/gemma.py`) as pure functions over the `llm/` param tree.

Einsum letters: B batch, T query positions, S key positions (cache slots), D width, N query heads,
K kv heads, G = N // K query heads per kv head, H head_dim, F mlp_dim, V vocab, L depth.

One `forward` serves the full pass (logits, prefill) and single-token decode: it attends from the new
positions to a key/value sequence that is the layer's cache with the new keys written at `write_index`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pgbatch.model.configs import TextConfig

MASK_VALUE = -2.3819763e38  # big_vision's masked-logit constant


def rms_norm(x, scale):
  """x * rsqrt(mean(x^2) + 1e-6) * (1 + scale), in float32. x [..., D]."""
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + 1e-6)
  return (y * (1.0 + scale.astype(jnp.float32))).astype(x.dtype)


def embed(params, tokens):
  """Token ids [B, T] -> embeddings [B, T, D], scaled by sqrt(D) in the table dtype."""
  table = params["embedder"]["input_embedding"]
  x = jnp.take(table, tokens, axis=0)
  return x * jnp.sqrt(jnp.float32(table.shape[1])).astype(x.dtype)


def logits(params, x, cfg: TextConfig):
  """Final norm + tied unembedding (+ optional soft-cap). x [B, T, D] -> float32 [B, T, V]."""
  x = rms_norm(x, params["final_norm"]["scale"])
  out = jnp.einsum("BTD,VD->BTV", x, params["embedder"]["input_embedding"],
                   preferred_element_type=jnp.float32)
  if cfg.final_logits_softcap:
    out = jnp.tanh(out / cfg.final_logits_softcap) * cfg.final_logits_softcap
  return out


def rope(x, positions, base: float):
  """Rotary embedding, split-halves convention. x [B, T, N, H], positions int [B, T]."""
  h = x.shape[-1]
  timescale = base ** (2 * jnp.arange(h // 2, dtype=jnp.float32) / h)
  rad = positions[..., None].astype(jnp.float32) / timescale          # [B, T, H/2]
  sin, cos = jnp.sin(rad)[:, :, None], jnp.cos(rad)[:, :, None]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def attend(q, k, v, mask, softcap: float):
  """q [B, T, N, H] (already scaled), k/v [B, S, K, H], mask bool [B, T, S] -> [B, T, N, H]."""
  b, t, n, h = q.shape
  kv_heads = k.shape[2]
  q = q.reshape(b, t, kv_heads, n // kv_heads, h)
  s = jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.float32)
  if softcap:
    s = jnp.tanh(s / softcap) * softcap
  s = jnp.where(mask[:, None, None], s, MASK_VALUE)
  probs = jax.nn.softmax(s, axis=-1).astype(v.dtype)
  return jnp.einsum("BKGTS,BSKH->BTKGH", probs, v).reshape(b, t, n, h)


def _block(p, x, positions, mask, cache_k, cache_v, write_index, cfg: TextConfig):
  """One decoder layer. x [B, T, D]; cache_k/v [B, S, K, H] receive this layer's keys at write_index.

  Returns (x [B, T, D], cache_k, cache_v).
  """
  attn = p["attn"]
  h = rms_norm(x, p["pre_attention_norm"]["scale"])
  q = jnp.einsum("BTD,NDH->BTNH", h, attn["q_einsum"]["w"])
  k, v = jnp.einsum("BSD,CKDH->CBSKH", h, attn["kv_einsum"]["w"])
  q = rope(q, positions, cfg.rope_base) * jnp.asarray(cfg.query_scale, q.dtype)
  k = rope(k, positions, cfg.rope_base)
  cache_k = jax.lax.dynamic_update_slice_in_dim(cache_k, k.astype(cache_k.dtype), write_index, axis=1)
  cache_v = jax.lax.dynamic_update_slice_in_dim(cache_v, v.astype(cache_v.dtype), write_index, axis=1)
  o = attend(q, cache_k.astype(q.dtype), cache_v.astype(q.dtype), mask, cfg.attn_logits_softcap)
  o = jnp.einsum("BTNH,NHD->BTD", o, attn["attn_vec_einsum"]["w"])
  if cfg.post_norms:
    o = rms_norm(o, p["post_attention_norm"]["scale"])
  x = x + o
  h = rms_norm(x, p["pre_ffw_norm"]["scale"])
  gate, up = jnp.einsum("BTD,CDF->CBTF", h, p["mlp"]["gating_einsum"])
  m = jnp.einsum("BTF,FD->BTD", jax.nn.gelu(gate, approximate=True) * up, p["mlp"]["linear"])
  if cfg.post_norms:
    m = rms_norm(m, p["post_ffw_norm"]["scale"])
  return x + m, cache_k, cache_v


def attention_mask(q_pos, k_pos, k_valid, k_visible, cfg: TextConfig, layer_sliding):
  """bool [B, T, S]: k_visible [B, T, S] (prefix-LM/causal), restricted to valid keys and the sliding window."""
  mask = k_visible & k_valid[:, None, :]
  if cfg.sliding_window:
    in_window = (q_pos[:, :, None] - k_pos[:, None, :]) < cfg.sliding_window
    mask = mask & (in_window | ~layer_sliding)
  return mask


def forward(params, x, positions, k_pos, k_valid, k_visible, cache, write_index, cfg: TextConfig):
  """Runs the decoder layers.

  x [B, T, D] new embeddings; positions int [B, T]; k_pos int [B, S], k_valid bool [B, S] describe every
  cache slot (after this call's writes); k_visible bool [B, T, S]; cache (k, v) each [L, B, S, K, H].
  Returns (hidden [B, T, D] before the final norm, updated cache).
  """
  sliding = (jnp.arange(cfg.depth) % 2 == 0)  # HF Gemma 2: even layers use the local window

  def body(x, layer):
    p, ck, cv, layer_sliding = layer
    mask = attention_mask(positions, k_pos, k_valid, k_visible, cfg, layer_sliding)
    x, ck, cv = _block(p, x, positions, mask, ck, cv, write_index, cfg)
    return x, (ck, cv)

  x, cache = jax.lax.scan(body, x, (params["layers"], cache[0], cache[1], sliding), unroll=cfg.unroll)
  return x, cache
