"""Safety policy: pydantic models for the job spec's `safety:` block, merged over the shipped defaults."""
from __future__ import annotations

import copy
import functools
import hashlib
import json
from importlib import resources
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Action = Literal["flag", "redact", "drop_content"]
OnError = Literal["fail_closed"]
PRECEDENCE = {"flag": 1, "redact": 2, "drop_content": 3}

PII_ENTITIES = (
    "CREDIT_CARD", "IBAN_CODE", "EMAIL_ADDRESS", "PHONE_NUMBER", "US_SSN", "IP_ADDRESS", "URL",
    "CRYPTO", "US_BANK_NUMBER", "US_PASSPORT", "US_DRIVER_LICENSE", "US_ITIN", "UK_NHS", "MAC_ADDRESS",
)
WORDLIST_LANGUAGES = ("ar", "az", "ch", "de", "en", "es", "fa", "fr", "hi", "ja", "ko", "pt", "ru", "tr", "zh")


class CategoryPolicy(BaseModel):
  """Per-category override of a filter's threshold and action."""
  model_config = ConfigDict(extra="forbid")
  threshold: float | None = Field(None, ge=0.0, le=1.0)
  action: Action | None = None


class FilterPolicy(BaseModel):
  """Common knobs of every filter."""
  model_config = ConfigDict(extra="forbid")
  enabled: bool = True
  fields: list[str] = ["*"]
  threshold: float = Field(0.5, ge=0.0, le=1.0)
  action: Action = "flag"
  on_error: OnError = "fail_closed"
  categories: dict[str, CategoryPolicy] = {}
  KNOWN_CATEGORIES: ClassVar[tuple[str, ...]] = ()  # keys allowed under `categories` (empty: not checked)

  def rule(self, category: str) -> tuple[float, str]:
    """(threshold, action) for a category after overrides."""
    c = self.categories.get(category)
    t = c.threshold if c is not None and c.threshold is not None else self.threshold
    a = c.action if c is not None and c.action is not None else self.action
    return float(t), a

  @field_validator("categories")
  @classmethod
  def _known_category_overrides(cls, v: dict) -> dict:
    bad = sorted(set(v) - set(cls.KNOWN_CATEGORIES))
    if bad and cls.KNOWN_CATEGORIES:
      raise ValueError(f"unknown {bad}; this filter reports {list(cls.KNOWN_CATEGORIES)}")
    return v

  def applies_to(self, column: str) -> bool:
    """Whether this filter scores the task column `column`."""
    return "*" in self.fields or column in self.fields or f"{column}.text" in self.fields


class ToxicityPolicy(FilterPolicy):
  threshold: float = Field(0.9, ge=0.0, le=1.0)
  KNOWN_CATEGORIES: ClassVar[tuple[str, ...]] = ("toxicity",)


class WordlistPolicy(FilterPolicy):
  threshold: float = Field(1.0, ge=0.0, le=1.0)
  languages: list[str] = ["en"]
  KNOWN_CATEGORIES: ClassVar[tuple[str, ...]] = ("profanity",)

  @field_validator("languages")
  @classmethod
  def _known_languages(cls, v: list[str]) -> list[str]:
    bad = [x for x in v if x not in WORDLIST_LANGUAGES]
    if bad:
      raise ValueError(f"unknown word-list language(s) {bad}; known: {list(WORDLIST_LANGUAGES)}")
    return v


class PiiPolicy(FilterPolicy):
  threshold: float = Field(0.4, ge=0.0, le=1.0)
  entities: list[str] = list(PII_ENTITIES[:7])
  language: str = "en"
  KNOWN_CATEGORIES: ClassVar[tuple[str, ...]] = PII_ENTITIES  # not only `entities`: the shipped URL override

  @field_validator("entities")
  @classmethod
  def _known_entities(cls, v: list[str]) -> list[str]:
    bad = [x for x in v if x not in PII_ENTITIES]
    if bad:
      raise ValueError(f"unknown entity(ies) {bad}; known: {list(PII_ENTITIES)}")
    return v

  @field_validator("language")
  @classmethod
  def _spacy_language(cls, v: str) -> str:
    import importlib.util
    if not v.isidentifier() or importlib.util.find_spec(f"spacy.lang.{v}") is None:
      raise ValueError(f"spaCy has no language {v!r} (needed for its blank tokenizer pipeline)")
    return v


class NsfwPolicy(FilterPolicy):
  fields: list[Literal["image"]] = ["image"]
  threshold: float = Field(0.8, ge=0.0, le=1.0)
  action: Action = "drop_content"
  KNOWN_CATEGORIES: ClassVar[tuple[str, ...]] = ("nsfw",)


class HashListPolicy(FilterPolicy):
  """Known-bad hashes: the action is always drop_content and cannot be overridden."""
  enabled: bool = False
  fields: list[Literal["image"]] = ["image"]
  threshold: float = Field(1.0, ge=1.0, le=1.0)
  action: Literal["drop_content"] = "drop_content"
  categories: dict[str, CategoryPolicy] = Field(default_factory=dict, max_length=0)
  uri: str | None = None
  algorithm: Literal["sha256", "md5", "phash"] = "sha256"
  max_distance: int = Field(4, ge=0, le=16)  # phash only: Hamming distance (bits of 64) that still matches

  @model_validator(mode="after")
  def _needs_uri(self) -> "HashListPolicy":
    if self.enabled and not self.uri:
      raise ValueError("uri is required when the hash list is enabled")
    return self


TEXT_FILTERS = ("toxicity", "wordlist", "pii")
IMAGE_FILTERS = ("hashlist", "nsfw")


def deep_merge(base: dict, over: dict) -> dict:
  """Recursive dict merge; `over` wins, lists are replaced."""
  out = copy.deepcopy(base)
  for k, v in over.items():
    out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
  return out


@functools.lru_cache(maxsize=1)
def default_dict() -> dict:
  """The shipped defaults (pgbatch/safety/defaults.yaml) as a dict."""
  return yaml.safe_load(resources.files("pgbatch.safety").joinpath("defaults.yaml").read_text())


class SafetyPolicy(BaseModel):
  """The resolved safety policy; `model_validate(x)` deep-merges `x` (dict or None) over the defaults."""
  model_config = ConfigDict(extra="forbid")
  toxicity: ToxicityPolicy = ToxicityPolicy()
  wordlist: WordlistPolicy = WordlistPolicy()
  pii: PiiPolicy = PiiPolicy()
  nsfw: NsfwPolicy = NsfwPolicy()
  hashlist: HashListPolicy = HashListPolicy()

  @model_validator(mode="before")
  @classmethod
  def _merge_defaults(cls, data: Any) -> Any:
    if data is None:
      return default_dict()
    if isinstance(data, dict):
      return deep_merge(default_dict(), data)
    return data

  @classmethod
  def default(cls) -> "SafetyPolicy":
    return cls.model_validate(None)

  def filter(self, name: str) -> FilterPolicy:
    return getattr(self, name)

  def enabled(self, names: tuple[str, ...] = TEXT_FILTERS + IMAGE_FILTERS) -> list[str]:
    return [n for n in names if self.filter(n).enabled]

  def check_fields(self, text_fields: list[str]) -> None:
    """ValueError naming the filter when its `fields` name a column that is not one of the job's text tasks."""
    for name in self.enabled(TEXT_FILTERS):
      for f in self.filter(name).fields:
        col = f[:-len(".text")] if f.endswith(".text") else f
        if f != "*" and col not in text_fields:
          raise ValueError(f"safety.{name}.fields: {f!r} is not a text task of this job "
                           f"(text tasks: {list(text_fields)}; '*' = all)")

  def digest(self) -> str:
    """sha256 of the canonical JSON of the resolved policy."""
    blob = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()
