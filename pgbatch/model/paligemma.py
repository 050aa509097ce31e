"""PaliGemma = SigLIP image tokens + Gemma decoder with a prefix-LM mask, and greedy decoding with a KV cache.

Sequence layout (one row): [image tokens (P)] [BOS prompt "\n" (len_b)] [pad …] | [generated …]
The image and the prompt form the bidirectional prefix; generated tokens are causal. Prompts are
left-aligned and right-padded to a bucket length T; pad slots are masked out, and generated tokens continue
the row's positions (P + len_b + j), so rows of different prompt lengths share one static shape.

Letters: B batch, P image tokens, T text positions, S cache slots, D width, V vocab, L depth, K kv heads, H head_dim.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from pgbatch.model import gemma, siglip
from pgbatch.model.configs import PaliGemmaConfig

EOS = 1


def encode_images(params, images, cfg: PaliGemmaConfig):
  """float [B, R, R, 3] in [-1, 1] -> image tokens [B, P, D] in the decoder's dtype."""
  return siglip.encode(params["img"], images, cfg.vision)


def _empty_cache(cfg: PaliGemmaConfig, batch: int, slots: int, dtype):
  t = cfg.text
  shape = (t.depth, batch, slots, t.num_kv_heads, t.head_dim)
  return jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)


def text_logits(params, images, tokens, prefix_len, cfg: PaliGemmaConfig):
  """Full forward. images [B, R, R, 3]; tokens int [B, T]; prefix_len int [B] text tokens in the prefix.

  Returns float32 logits [B, T, V] at the text positions.
  """
  llm = params["llm"]
  zimg = encode_images(params, images, cfg)
  x = jnp.concatenate([zimg, gemma.embed(llm, tokens).astype(zimg.dtype)], axis=1)
  b, s, _ = x.shape
  p = zimg.shape[1]
  pos = jnp.broadcast_to(jnp.arange(s), (b, s))
  in_prefix = pos < (p + prefix_len)[:, None]                                   # [B, S]
  visible = in_prefix[:, None, :] | (pos[:, None, :] <= pos[:, :, None])        # [B, T, S]
  cache = _empty_cache(cfg, b, s, x.dtype)
  h, _ = gemma.forward(llm, x, pos, pos, jnp.ones((b, s), bool), visible, cache, 0, cfg.text)
  return gemma.logits(llm, h[:, p:], cfg.text)


class DecodeState(NamedTuple):
  """What a greedy step reads and writes. cache (k, v) each [L, B, S, K, H]; k_pos int [B, S] and k_valid
  bool [B, S] describe every slot; gen_pos int [B, N] the positions of the N new tokens; s0 = P + T."""
  cache: tuple
  k_pos: jax.Array
  k_valid: jax.Array
  gen_pos: jax.Array


def prefill(params, zimg, tokens, lengths, *, cfg: PaliGemmaConfig, max_new_tokens: int):
  """The bidirectional prefix pass. zimg [B, P, D]; tokens int32 [B, T]; lengths int32 [B].

  Returns (first-token logits float32 [B, V], DecodeState with the prefix written into the cache).
  """
  llm, tcfg = params["llm"], cfg.text
  b, p = zimg.shape[:2]
  t = tokens.shape[1]
  s0 = p + t
  slots = s0 + max_new_tokens
  x = jnp.concatenate([zimg, gemma.embed(llm, tokens).astype(zimg.dtype)], axis=1)
  prefix_pos = jnp.broadcast_to(jnp.arange(s0), (b, s0))
  gen_pos = p + lengths[:, None] + jnp.arange(max_new_tokens)                    # [B, max_new]
  k_pos = jnp.concatenate([prefix_pos, gen_pos], axis=1)                         # [B, S]
  prefix_valid = jnp.concatenate([jnp.ones((b, p), bool), jnp.arange(t) < lengths[:, None]], axis=1)
  k_valid = jnp.concatenate([prefix_valid, jnp.zeros((b, max_new_tokens), bool)], axis=1)
  cache = _empty_cache(cfg, b, slots, x.dtype)
  h, cache = gemma.forward(llm, x, prefix_pos, k_pos, k_valid, jnp.ones((b, s0, slots), bool),
                           cache, 0, tcfg)
  last = jnp.take_along_axis(h, (p + lengths - 1)[:, None, None], axis=1)        # [B, 1, D]
  return gemma.logits(llm, last, tcfg)[:, 0], DecodeState(cache, k_pos, k_valid, gen_pos)


def decode_step(params, token, i, state: DecodeState, *, cfg: PaliGemmaConfig):
  """Feeds new token i - 1 (int32 [B]) at its slot. Returns (logits float32 [B, V], state)."""
  llm, tcfg = params["llm"], cfg.text
  b, slots = state.k_valid.shape
  s0 = slots - state.gen_pos.shape[1]
  slot = s0 + i - 1
  k_valid = state.k_valid.at[:, slot].set(True)
  x = gemma.embed(llm, token[:, None]).astype(state.cache[0].dtype)
  pos = jax.lax.dynamic_slice_in_dim(state.gen_pos, i - 1, 1, axis=1)            # [B, 1]
  h, cache = gemma.forward(llm, x, pos, state.k_pos, k_valid, jnp.ones((b, 1, slots), bool),
                           state.cache, slot, tcfg)
  return gemma.logits(llm, h, tcfg)[:, 0], state._replace(cache=cache, k_valid=k_valid)


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "stop_at_eos"))
def generate_tokens(params, zimg, tokens, lengths, row_valid, *, cfg: PaliGemmaConfig, max_new_tokens: int,
                    stop_at_eos: bool = True):
  """Greedy decoding from image tokens: `prefill`, then `decode_step` until every valid row is done.

  zimg [B, P, D]; tokens int32 [B, T] left-aligned prompts (BOS … "\n"), right-padded; lengths int32 [B];
  row_valid bool [B] (False for batch padding). Returns (tokens int32 [B, max_new_tokens], steps int32):
  row b's new tokens up to its first EOS are meaningful; decoding stops once every valid row hit EOS
  (with stop_at_eos=False it always runs max_new_tokens steps: benchmarks).
  """
  logits, state = prefill(params, zimg, tokens, lengths, cfg=cfg, max_new_tokens=max_new_tokens)
  first = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  out = jnp.zeros((zimg.shape[0], max_new_tokens), jnp.int32).at[:, 0].set(first)
  eos = EOS if stop_at_eos else -1
  done = ~row_valid | (first == eos)

  def cond(carry):
    i, _, _, done = carry
    return (i < max_new_tokens) & ~jnp.all(done)

  def step(carry):
    i, out, state, done = carry
    token = jax.lax.dynamic_index_in_dim(out, i - 1, axis=1, keepdims=False)
    logits, state = decode_step(params, token, i, state, cfg=cfg)
    tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    out = jax.lax.dynamic_update_slice_in_dim(out, tok[:, None], i, axis=1)
    return i + 1, out, state, done | (tok == eos)

  steps, out, _, _ = jax.lax.while_loop(cond, step, (jnp.int32(1), out, state, done))
  return out, steps
