"""One batch through the model, without Ray: tasks + tokenizer + Engine → typed task columns.

    annotator = annotate.load(spec, model_variant)            # tokenizer, model on this process's devices, Engine
    out = annotator(pixels, status, errors, widths, heights, metadata)
    out.status, out.errors, out.columns["caption_en"]           # per row; one Arrow array per task

Rows whose status is not "ok" pass through with null task columns. A row whose prompt cannot be built (an answer
task's question field missing) becomes an error row; a batch the model fails on is halved until the failing rows
are found, and only those become error rows (stage "annotate"). Prompt token ids are cached (bounded; safe when
two batches run on two threads).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import threading
from typing import Any, Optional, Sequence

import numpy as np
import pyarrow as pa

from pgbatch.tasks import PromptError, Task

log = logging.getLogger(__name__)
PROMPT_CACHE_SIZE = 4096


def question_fields(metadata: Optional[str]) -> dict:
  """The fields an answer task's `question_field` is looked up in: the row's metadata (Parquet: the other
  columns) merged over the fields of a WebDataset `.json` sidecar (kept under "json" by the reader)."""
  try:
    meta = json.loads(metadata) if metadata else {}
  except (TypeError, ValueError):
    return {}
  if not isinstance(meta, dict):
    return {}
  sidecar = meta.get("json")
  return {**sidecar, **meta} if isinstance(sidecar, dict) else meta


def _annotate_error(e: BaseException) -> dict:
  return {"stage": "annotate", "type": type(e).__name__, "message": str(e)[:2000]}


@dataclasses.dataclass
class Annotated:
  """The result for one batch of n rows: `status`/`errors` updated, one typed column per task."""
  status: list[str]
  errors: list[Optional[dict]]
  columns: dict[str, pa.Array]


class Annotator:
  """Greedy annotation of decoded batches for every task of a job (see the module doc)."""

  def __init__(self, engine, tokenizer, tasks: Sequence[Task], is_fatal=lambda e: None):
    """`is_fatal(e)` is called with every model failure first (the pipeline ends the process on a dead device)."""
    self.engine, self.tokenizer, self.tasks, self.is_fatal = engine, tokenizer, list(tasks), is_fatal
    self._cache: dict[str, list[int]] = {}
    self._cache_lock = threading.Lock()

  def warm_up(self) -> int:
    """Compiles the programs of every batch bucket for each task's prompt (an answer task with per-row questions:
    the prompt-length bucket of a short question). Returns the number of XLA compiles."""
    prompts = {t.name: self.tokens(t.prompt({t.question_field: "what is this?"} if t.question_field else None))
               for t in self.tasks}
    return self.engine.warm_up(prompts, {t.name: t.max_new_tokens for t in self.tasks})

  def tokens(self, text: str) -> list[int]:
    """Cached prompt ids (BOS … "\\n")."""
    ids = self._cache.get(text)
    if ids is None:
      ids = self.tokenizer.encode_prompt(text)
      with self._cache_lock:
        if len(self._cache) >= PROMPT_CACHE_SIZE:  # per-image questions: keep the cache bounded
          self._cache.clear()
        self._cache[text] = ids
    return ids

  def prompts(self, metadata: Sequence[Optional[str]], live: list[int], status: list, errors: list):
    """Prompt texts per task for the `live` rows → (task → text per row index, rows kept). Rows whose prompt
    cannot be built become errors."""
    texts: dict[str, dict[int, str]] = {t.name: {} for t in self.tasks}
    keep = []
    for i in live:
      meta, row = None, {}
      try:
        for t in self.tasks:
          if t.question_field is not None and meta is None:
            meta = question_fields(metadata[i])
          row[t.name] = t.prompt(meta)
      except (PromptError, ValueError) as e:
        status[i], errors[i] = "error", {"stage": "annotate", "type": type(e).__name__, "message": str(e)}
        continue
      keep.append(i)
      for name, p in row.items():
        texts[name][i] = p
    return texts, keep

  def annotate(self, pixels: np.ndarray, widths: Sequence[int], heights: Sequence[int],
               prompt_texts: dict[str, list[str]]) -> dict[str, list]:
    """pixels uint8 [n, R, R, 3] → task name → n parsed values (tokens decoded up to EOS; `truncated` when the
    budget ran out before EOS)."""
    from pgbatch.tokenizer import EOS
    prompts = {name: [self.tokens(p) for p in texts] for name, texts in prompt_texts.items()}
    tokens = self.engine.annotate(pixels, prompts, {t.name: t.max_new_tokens for t in self.tasks})
    out = {}
    for t in self.tasks:
      rows = tokens[t.name]
      texts = [self.tokenizer.decode(r) for r in rows]
      truncated = [not (r and r[-1] == EOS) and len(r) >= t.max_new_tokens for r in rows]
      out[t.name] = t.parse_batch(texts, [len(r) for r in rows], truncated, widths, heights, prompt_texts[t.name])
    return out

  def _isolating(self, idx: list[int], pixels, widths, heights, texts, status, errors, results) -> None:
    """Annotates rows `idx` into `results`; on failure halves the batch until the failing rows are found."""
    try:
      values = self.annotate(pixels[idx], [widths[i] for i in idx], [heights[i] for i in idx],
                             {name: [by_row[i] for i in idx] for name, by_row in texts.items()})
    except Exception as e:  # noqa: BLE001 - isolated below; a dead device ends the process in is_fatal
      self.is_fatal(e)
      if len(idx) == 1:
        log.warning("annotation failed for one row: %r", e)
        status[idx[0]], errors[idx[0]] = "error", _annotate_error(e)
        return
      half = len(idx) // 2
      for part in (idx[:half], idx[half:]):
        self._isolating(part, pixels, widths, heights, texts, status, errors, results)
      return
    for name, vals in values.items():
      for i, v in zip(idx, vals):
        results[name][i] = v

  def __call__(self, pixels: np.ndarray, status: Sequence[str], errors: Sequence[Optional[dict]],
               widths: Sequence[Optional[int]], heights: Sequence[Optional[int]],
               metadata: Optional[Sequence[Optional[str]]] = None) -> Annotated:
    """pixels uint8 [n, R, R, 3]; per row: status, error struct (or None), original width/height (None when
    unknown), metadata JSON. Returns the updated status/errors and one typed column per task."""
    n = len(status)
    status, errors = list(status), list(errors)
    metadata = list(metadata) if metadata is not None else [None] * n
    results: dict[str, list[Any]] = {t.name: [None] * n for t in self.tasks}
    live = [i for i in range(n) if status[i] == "ok"]
    if live:
      texts, live = self.prompts(metadata, live, status, errors)
      if live:
        self._isolating(live, np.asarray(pixels), [w or 1 for w in widths], [h or 1 for h in heights], texts,
                        status, errors, results)
    columns = {t.name: pa.array(results[t.name], t.arrow_type) for t in self.tasks}
    return Annotated(status, errors, columns)


def load(spec, model_variant: Optional[str] = None, is_fatal=lambda e: None) -> tuple[Annotator, Any]:
  """The Annotator of a job on this process's devices → (annotator, model). `model_variant` (from the
  checkpoint's headers) picks the mesh when the spec names no variant."""
  from pgbatch import tokenizer as tokenizer_lib
  from pgbatch.engine import Engine
  from pgbatch.model import loading
  tok = tokenizer_lib.load(spec.model.tokenizer)
  mesh = loading.replica_mesh(spec.resources.accelerator, spec.model.variant or model_variant)
  model = loading.load(spec.model.checkpoint, dtype=spec.model.dtype, mesh=mesh, variant=spec.model.variant)
  vae = None
  if any(t.kind == "segment" for t in spec.tasks):
    from pgbatch.model import vqvae
    vae = vqvae.load(spec.model.vae)
  engine = Engine(model, batch_size=spec.resources.batch_size)
  return Annotator(engine, tok, spec.task_objects(vae=vae), is_fatal), model
