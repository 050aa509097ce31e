"""The big_vision <-> Hugging Face tensor mapping (spec §7): one rule per big_vision name, with the transposes and
reshapes both ways. HF names use the legacy hub spelling; `canonical_hf_key` folds every transformers spelling.

Letters: L depth, N heads, K kv heads, H head_dim, D width, F mlp_dim, W vision width, P patches, V vocab.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Callable, Optional

import numpy as np

from pgbatch.model import configs

VIS = "vision_tower.vision_model."


TXT = "language_model.model."


_SPELLINGS = (  # (prefix as found, canonical prefix); first match wins.
    ("model.vision_tower.vision_model.", VIS), ("model.vision_tower.", VIS),
    ("vision_tower.vision_model.", VIS), ("vision_tower.", VIS),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.language_model.", TXT), ("language_model.model.", TXT),
    ("language_model.lm_head.", "language_model.lm_head."), ("lm_head.", "language_model.lm_head."),
)


# Present in HF files but not part of PaliGemma's forward: the tied lm_head, SigLIP's unused MAP head, RoPE buffers.
IGNORED_HF = re.compile(r"^(language_model\.lm_head\..*|vision_tower\.vision_model\.head\..*|.*\.rotary_emb\.inv_freq)$")


def canonical_hf_key(key: str) -> str:
  """Any transformers spelling (legacy hub, v4.5x `model.*`, v5 save) → legacy hub spelling."""
  for found, canon in _SPELLINGS:
    if key.startswith(found):
      return canon + key[len(found):]
  return key


@dataclasses.dataclass(frozen=True)
class Rule:
  """One big_vision tensor ← HF tensor(s). `stacked`: per layer `{i}`, BV stacks on a leading depth axis."""
  bv: str
  hf: tuple[str, ...]
  to_bv: Callable[..., np.ndarray]   # HF arrays (one layer) → BV array (one layer)
  to_hf: Callable[[np.ndarray], tuple[np.ndarray, ...]]
  stacked: bool = False
  vocab_rows: bool = False           # HF rows beyond the BV vocabulary are dropped


def same(x):
  return x


def rules(cfg: configs.PaliGemmaConfig) -> list[Rule]:
  """The BV ↔ HF table for `cfg`, one rule per big_vision name of `configs.param_shapes(cfg)`."""
  t, v = cfg.text, cfg.vision
  N, K, H, D = t.num_heads, t.num_kv_heads, t.head_dim, t.width
  Nv, Hv, W = v.num_heads, v.head_dim, v.width
  blk, mha = "img/Transformer/encoderblock", "img/Transformer/encoderblock/MultiHeadDotProductAttention_0"
  vl, tl = VIS + "encoder.layers.{i}.", TXT + "layers.{i}."
  ident = lambda x: (x,)
  transpose = lambda x: (x.T,)
  r = [
      Rule("img/embedding/kernel", (VIS + "embeddings.patch_embedding.weight",),
            lambda w: w.transpose(2, 3, 1, 0), lambda k: (k.transpose(3, 2, 0, 1),)),   # OIHW <-> HWIO
      Rule("img/embedding/bias", (VIS + "embeddings.patch_embedding.bias",), same, ident),
      Rule("img/pos_embedding", (VIS + "embeddings.position_embedding.weight",),
            lambda w: w[None], lambda p: (p.reshape(-1, p.shape[-1]),)),
      Rule("img/Transformer/encoder_norm/scale", (VIS + "post_layernorm.weight",), same, ident),
      Rule("img/Transformer/encoder_norm/bias", (VIS + "post_layernorm.bias",), same, ident),
      Rule("img/head/kernel", ("multi_modal_projector.linear.weight",), lambda w: w.T, transpose),
      Rule("img/head/bias", ("multi_modal_projector.linear.bias",), same, ident),
      Rule(f"{blk}/MlpBlock_0/Dense_0/kernel", (vl + "mlp.fc1.weight",), lambda w: w.T, transpose, True),
      Rule(f"{blk}/MlpBlock_0/Dense_1/kernel", (vl + "mlp.fc2.weight",), lambda w: w.T, transpose, True),
      Rule(f"{blk}/MlpBlock_0/Dense_0/bias", (vl + "mlp.fc1.bias",), same, ident, True),
      Rule(f"{blk}/MlpBlock_0/Dense_1/bias", (vl + "mlp.fc2.bias",), same, ident, True),
      # [W, Nv, Hv] <-> [Nv*Hv, W]; [Nv, Hv, W] <-> [W, Nv*Hv].
      Rule(f"{mha}/out/kernel", (vl + "self_attn.out_proj.weight",),
            lambda w: w.T.reshape(-1, Hv, w.shape[0]), lambda k: (k.reshape(-1, k.shape[-1]).T,), True),
      Rule(f"{mha}/out/bias", (vl + "self_attn.out_proj.bias",), same, ident, True),
      Rule("llm/embedder/input_embedding", (TXT + "embed_tokens.weight",), same, ident, vocab_rows=True),
      Rule("llm/final_norm/scale", (TXT + "norm.weight",), same, ident),
      # q [N, D, H] <-> q_proj [N*H, D]: q[n, d, h] = q_proj[n*H + h, d].
      Rule("llm/layers/attn/q_einsum/w", (tl + "self_attn.q_proj.weight",),
            lambda w: w.reshape(-1, H, w.shape[-1]).transpose(0, 2, 1),
            lambda q: (q.transpose(0, 2, 1).reshape(-1, q.shape[1]),), True),
      # kv [2, K, D, H] <-> k_proj, v_proj [K*H, D].
      Rule("llm/layers/attn/kv_einsum/w", (tl + "self_attn.k_proj.weight", tl + "self_attn.v_proj.weight"),
            lambda k, v: np.stack([x.reshape(-1, H, x.shape[-1]).transpose(0, 2, 1) for x in (k, v)]),
            lambda kv: tuple(x.transpose(0, 2, 1).reshape(-1, x.shape[1]) for x in kv), True),
      # attn_vec [N, H, D] <-> o_proj [D, N*H]: attn_vec[n, h, d] = o_proj[d, n*H + h].
      Rule("llm/layers/attn/attn_vec_einsum/w", (tl + "self_attn.o_proj.weight",),
            lambda w: w.T.reshape(-1, H, w.shape[0]), lambda a: (a.reshape(-1, a.shape[-1]).T,), True),
      # gating [2, D, F] <-> gate_proj, up_proj [F, D]; linear [F, D] <-> down_proj [D, F].
      Rule("llm/layers/mlp/gating_einsum", (tl + "mlp.gate_proj.weight", tl + "mlp.up_proj.weight"),
            lambda g, u: np.stack([g.T, u.T]), lambda w: (w[0].T, w[1].T), True),
      Rule("llm/layers/mlp/linear", (tl + "mlp.down_proj.weight",), lambda w: w.T, transpose, True),
      Rule("llm/layers/pre_attention_norm/scale", (tl + "input_layernorm.weight",), same, ident, True),
  ]
  for i, ln in enumerate(("LayerNorm_0", "LayerNorm_1")):
    for bv, hf in (("scale", "weight"), ("bias", "bias")):
      r.append(Rule(f"{blk}/{ln}/{bv}", (vl + f"layer_norm{i + 1}.{hf}",), same, ident, True))
  for x, hf in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
    r.append(Rule(f"{mha}/{x}/kernel", (vl + f"self_attn.{hf}.weight",),
                   lambda w: w.T.reshape(w.shape[1], -1, Hv), lambda k: (k.reshape(k.shape[0], -1).T,), True))
    r.append(Rule(f"{mha}/{x}/bias", (vl + f"self_attn.{hf}.bias",),
                   lambda b: b.reshape(-1, Hv), lambda b: (b.reshape(-1),), True))
  norms = ((("pre_ffw_norm", "post_attention_layernorm"),) if not t.post_norms else
           (("post_attention_norm", "post_attention_layernorm"), ("pre_ffw_norm", "pre_feedforward_layernorm"),
            ("post_ffw_norm", "post_feedforward_layernorm")))
  for bv, hf in norms:  # Gemma 1 HF `post_attention_layernorm` is BV `pre_ffw_norm` (sic).
    r.append(Rule(f"llm/layers/{bv}/scale", (tl + f"{hf}.weight",), same, ident, True))
  del W, N, K, D  # (documentation only)
  return sorted(r, key=lambda x: x.bv)


def shape_of(fn, *shapes_dtypes) -> Optional[tuple[int, ...]]:
  """Shape of fn(arrays) without data: applied to zero-stride arrays. None if the shapes do not fit."""
  args = [np.broadcast_to(np.zeros((), np.int8), s) for s in shapes_dtypes]
  try:
    out = fn(*args)
  except ValueError:
    return None
  return tuple(o.shape for o in out) if isinstance(out, tuple) else out.shape

