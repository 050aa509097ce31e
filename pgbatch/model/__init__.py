"""PaliGemma 1/2 in JAX: `load` a checkpoint, then `logits` / `generate`.

    m = pgbatch.model.load(uri, dtype="bfloat16", mesh=None)
    m.logits(images, tokens, prefix_len)        # float32 [B, T, V]
    m.generate(images, prompts, max_new_tokens) # list of new-token lists, ending at EOS if emitted

Params are a plain nested dict in big_vision's layout (see `configs.param_shapes`). Modules: `configs` (variants,
parameter shapes; no JAX), `siglip`, `gemma`, `paligemma`, `vqvae` (pure functions), `sharding`, `replica` (the
`PaliGemma` replica), `loading` (checkpoint → devices), `random_weights` (numpy).

Importing this package imports nothing heavy: the names below load their module (and JAX) on first use, so
`from pgbatch.model import configs` stays cheap.
"""
from __future__ import annotations

import importlib

_LAZY = {  # public name → module that defines it
    "load": "loading", "from_params": "loading", "place": "loading", "unflatten": "loading",
    "PaliGemma": "replica", "pad_prompts": "replica", "trim_at_eos": "replica", "EOS": "replica",
    "PROMPT_BUCKETS": "replica", "make_mesh": "sharding", "PaliGemmaConfig": "configs",
    "random_params": "random_weights", "random_tensors": "random_weights",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str):
  if name not in _LAZY:
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
  return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
