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
  h, _ = gemma.forward(llm, x, pos, jnp.ones((b, s), bool), visible, cfg.text)
  return gemma.logits(llm, h[:, p:], cfg.text)


class DecodeState(NamedTuple):
  """What a greedy step reads and writes.

  prefix_k/v [L, B, S0, K, H] (S0 = P + T; written by `prefill`, read only after), prefix_pos int [B, S0],
  prefix_valid bool [B, S0]; gen_k/v [L, B, N, K, H] the new tokens' keys (token j written at slot j by the
  step that feeds it), gen_pos int [B, N] their positions (P + length + j).
  """
  prefix_k: jax.Array
  prefix_v: jax.Array
  prefix_pos: jax.Array
  prefix_valid: jax.Array
  gen_k: jax.Array
  gen_v: jax.Array
  gen_pos: jax.Array


def prefill(params, zimg, tokens, lengths, *, cfg: PaliGemmaConfig, max_new_tokens: int):
  """The bidirectional prefix pass. zimg [B, P, D]; tokens int32 [B, T]; lengths int32 [B].

  Returns (first-token logits float32 [B, V], DecodeState holding the prefix's keys/values).
  """
  llm, tcfg = params["llm"], cfg.text
  b, p = zimg.shape[:2]
  t = tokens.shape[1]
  s0 = p + t
  x = jnp.concatenate([zimg, gemma.embed(llm, tokens).astype(zimg.dtype)], axis=1)
  prefix_pos = jnp.broadcast_to(jnp.arange(s0), (b, s0))
  prefix_valid = jnp.concatenate([jnp.ones((b, p), bool), jnp.arange(t) < lengths[:, None]], axis=1)
  h, (k, v) = gemma.forward(llm, x, prefix_pos, prefix_valid, jnp.ones((b, s0, s0), bool), tcfg)
  last = jnp.take_along_axis(h, (p + lengths - 1)[:, None, None], axis=1)        # [B, 1, D]
  gen_shape = (tcfg.depth, b, max_new_tokens, tcfg.num_kv_heads, tcfg.head_dim)
  gen_pos = p + lengths[:, None] + jnp.arange(max_new_tokens)                    # [B, N]
  state = DecodeState(k, v, prefix_pos, prefix_valid, jnp.zeros(gen_shape, k.dtype), jnp.zeros(gen_shape, v.dtype),
                      gen_pos)
  return gemma.logits(llm, last, tcfg)[:, 0], state


def decode_step(params, token, i, state: DecodeState, *, cfg: PaliGemmaConfig):
  """Feeds new token j = i - 1 (int32 [B]) at its position; its keys go to slot j of the new-token cache.

  Returns (logits float32 [B, V] for token i, state).
  """
  llm, tcfg = params["llm"], cfg.text
  j = i - 1
  x = gemma.embed(llm, token[:, None]).astype(state.prefix_k.dtype)               # [B, 1, D]
  pos = jax.lax.dynamic_slice_in_dim(state.gen_pos, j, 1, axis=1)                # [B, 1]
  prefix = (state.prefix_k, state.prefix_v, state.prefix_pos, state.prefix_valid)
  h, (gen_k, gen_v) = gemma.decode(llm, x, pos, prefix, (state.gen_k, state.gen_v, state.gen_pos), j, tcfg)
  return gemma.logits(llm, h, tcfg)[:, 0], state._replace(gen_k=gen_k, gen_v=gen_v)


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
