"""Gemma 1 / Gemma 2 decoder (big_vision `ppp/gemma.py`) as pure functions over the `llm/` param tree.

Einsum letters: B batch, T query positions, S key positions (cache slots), D width, N query heads,
K kv heads, G = N // K query heads per kv head, H head_dim, F mlp_dim, V vocab, L depth.

`forward` is the full pass (logits, prefill) and returns every layer's keys/values; `decode` feeds one new
token per row, reading the prefix's keys/values and writing its own into a small new-token cache in place.
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


def rope_tables(positions, head_dim: int, base: float):
  """sin, cos float32 [B, T, 1, H/2] for positions int [B, T]: computed once per pass, shared by every layer."""
  timescale = base ** (2 * jnp.arange(head_dim // 2, dtype=jnp.float32) / head_dim)
  rad = positions[..., None].astype(jnp.float32) / timescale                     # [B, T, H/2]
  return jnp.sin(rad)[:, :, None], jnp.cos(rad)[:, :, None]


def rope(x, tables):
  """Rotary embedding, split-halves convention, in x's dtype (as transformers). x [B, T, N, H]."""
  sin, cos = (t.astype(x.dtype) for t in tables)
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def attend(q, k, v, mask, softcap: float):
  """q [B, T, N, H] (already scaled), k/v [B, S, K, H], mask bool [B, T, S] -> [B, T, N, H]."""
  return attend_blocks(q, ((k, v, mask),), softcap)


def attend_blocks(q, blocks, softcap: float):
  """Attention over several key blocks with one softmax: blocks = ((k, v [B, S_i, K, H], mask bool [B, T, S_i]),
  ...). q [B, T, N, H] (already scaled) -> [B, T, N, H]. Keys stay where they are (no concatenated cache)."""
  b, t, n, h = q.shape
  kv_heads = blocks[0][0].shape[2]
  q = q.reshape(b, t, kv_heads, n // kv_heads, h)
  scores = []
  for k, _, mask in blocks:
    s = jnp.einsum("BTKGH,BSKH->BKGTS", q, k.astype(q.dtype), preferred_element_type=jnp.float32)
    if softcap:
      s = jnp.tanh(s / softcap) * softcap
    scores.append(jnp.where(mask[:, None, None], s, MASK_VALUE))
  probs = jax.nn.softmax(jnp.concatenate(scores, axis=-1), axis=-1)
  out, start = 0, 0
  for k, v, _ in blocks:
    p = jax.lax.slice_in_dim(probs, start, start + k.shape[1], axis=-1).astype(q.dtype)
    out = out + jnp.einsum("BKGTS,BSKH->BTKGH", p, v.astype(q.dtype))
    start += k.shape[1]
  return out.reshape(b, t, n, h)


def _qkv(p, x, tables, cfg: TextConfig):
  """Pre-norm projections. x [B, T, D]; tables from `rope_tables`.
  Returns q [B, T, N, H] (roped, scaled), k/v [B, T, K, H] (k roped)."""
  attn = p["attn"]
  h = rms_norm(x, p["pre_attention_norm"]["scale"])
  q = jnp.einsum("BTD,NDH->BTNH", h, attn["q_einsum"]["w"])
  k, v = jnp.einsum("BSD,CKDH->CBSKH", h, attn["kv_einsum"]["w"])
  q = rope(q, tables) * jnp.asarray(cfg.query_scale, q.dtype)
  return q, rope(k, tables), v


def _finish(p, x, o, cfg: TextConfig):
  """Attention output projection, residual, MLP, residual. x [B, T, D]; o [B, T, N, H] -> [B, T, D]."""
  o = jnp.einsum("BTNH,NHD->BTD", o, p["attn"]["attn_vec_einsum"]["w"])
  if cfg.post_norms:
    o = rms_norm(o, p["post_attention_norm"]["scale"])
  x = x + o
  h = rms_norm(x, p["pre_ffw_norm"]["scale"])
  gate, up = jnp.einsum("BTD,CDF->CBTF", h, p["mlp"]["gating_einsum"])
  m = jnp.einsum("BTF,FD->BTD", jax.nn.gelu(gate, approximate=True) * up, p["mlp"]["linear"])
  if cfg.post_norms:
    m = rms_norm(m, p["post_ffw_norm"]["scale"])
  return x + m


def attention_mask(q_pos, k_pos, k_valid, k_visible, cfg: TextConfig, layer_sliding):
  """bool [B, T, S]: k_visible [B, T, S] (prefix-LM/causal), restricted to valid keys and the sliding window."""
  mask = k_visible & k_valid[:, None, :]
  if cfg.sliding_window:
    in_window = (q_pos[:, :, None] - k_pos[:, None, :]) < cfg.sliding_window
    mask = mask & (in_window | ~layer_sliding)
  return mask


def _sliding_layers(cfg: TextConfig):
  return jnp.arange(cfg.depth) % 2 == 0  # HF Gemma 2: even layers use the local window


def forward(params, x, positions, valid, visible, cfg: TextConfig):
  """The full pass (logits, prefill): T positions attending to each other.

  x [B, T, D]; positions int [B, T]; valid bool [B, T] (False for padding); visible bool [B, T, T]
  (prefix-LM / causal). Returns (hidden [B, T, D] before the final norm, (k, v) each [L, B, T, K, H]).
  """
  tables = rope_tables(positions, cfg.head_dim, cfg.rope_base)

  def body(x, layer):
    p, layer_sliding = layer
    q, k, v = _qkv(p, x, tables, cfg)
    mask = attention_mask(positions, positions, valid, visible, cfg, layer_sliding)
    if cfg.attn_logits_softcap:  # Gemma 2: the soft-cap needs the scores, which fused attention never forms
      o = attend(q, k, v, mask, cfg.attn_logits_softcap)
    else:
      o = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], scale=1.0)  # q is already scaled
    return _finish(p, x, o, cfg), (k, v)

  return jax.lax.scan(body, x, (params["layers"], _sliding_layers(cfg)), unroll=cfg.unroll)


def decode(params, x, pos, prefix, gen, j, cfg: TextConfig):
  """One new position per row, attending to the prefix and to new tokens 0..j.

  x [B, 1, D]; pos int [B, 1]; prefix = (k, v each [L, B, S0, K, H], k_pos int [B, S0], k_valid bool [B, S0]),
  read only; gen = (k, v each [L, B, N, K, H], k_pos int [B, N]): this call writes its keys at slot j in place
  (the caches are carried through the layer loop, never copied) and masks slots > j.
  Returns (hidden [B, 1, D], (gen k, gen v)).
  """
  prefix_k, prefix_v, prefix_pos, prefix_valid = prefix
  gen_k, gen_v, gen_pos = gen
  b, n = gen_pos.shape
  always = jnp.ones((b, 1, 1), bool)
  gen_valid = jnp.broadcast_to(jnp.arange(n) <= j, (b, n))
  tables = rope_tables(pos, cfg.head_dim, cfg.rope_base)

  def body(carry, layer):
    x, gen_k, gen_v = carry
    p, pk, pv, l, layer_sliding = layer
    q, k, v = _qkv(p, x, tables, cfg)
    gen_k = jax.lax.dynamic_update_slice(gen_k, k[None].astype(gen_k.dtype), (l, 0, j, 0, 0))
    gen_v = jax.lax.dynamic_update_slice(gen_v, v[None].astype(gen_v.dtype), (l, 0, j, 0, 0))
    gk = jax.lax.dynamic_index_in_dim(gen_k, l, keepdims=False)
    gv = jax.lax.dynamic_index_in_dim(gen_v, l, keepdims=False)
    masks = (attention_mask(pos, prefix_pos, prefix_valid, always, cfg, layer_sliding),
             attention_mask(pos, gen_pos, gen_valid, always, cfg, layer_sliding))
    o = attend_blocks(q, ((pk, pv, masks[0]), (gk, gv, masks[1])), cfg.attn_logits_softcap)
    return (_finish(p, x, o, cfg), gen_k, gen_v), None

  layers = (params["layers"], prefix_k, prefix_v, jnp.arange(cfg.depth), _sliding_layers(cfg))
  (x, gen_k, gen_v), _ = jax.lax.scan(body, (x, gen_k, gen_v), layers, unroll=cfg.unroll)
  return x, (gen_k, gen_v)
