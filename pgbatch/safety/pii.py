"""Personal information: presidio-analyzer pattern recognizers on a blank spaCy pipeline, fully offline.

Presidio's default NLP engine wants en_core_web_lg (and downloads it when missing). Here a blank
`spacy.blank(lang)` pipeline is saved once under the pgbatch cache dir and SpacyNlpEngine is pointed at that
path, so nothing is downloaded; the only recognizers are validated patterns (Luhn, IBAN checksum, phonenumbers,
SSN rules, ...). The e-mail recognizer's domain check uses tldextract's bundled suffix snapshot instead of
fetching the live list. A blank pipeline has no lemmatizer, so lower-cased token text stands in for lemmas:
presidio's context words ("ssn", "iban", "phone" ...) then still raise the score of a weak pattern next to them.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile

from pgbatch.safety.base import Hit, cache_dir


def blank_pipeline_path(lang: str) -> str:
  """Save spacy.blank(lang) under the cache dir at first use (atomically); return its path."""
  import spacy
  path = os.path.join(cache_dir(), f"spacy-blank-{lang}-{spacy.__version__}")
  if not os.path.isdir(path):
    os.makedirs(cache_dir(), exist_ok=True)
    tmp = tempfile.mkdtemp(dir=cache_dir(), prefix=".spacy-")
    spacy.blank(lang).to_disk(tmp)
    try:
      os.rename(tmp, path)
    except OSError:  # another worker won the race
      shutil.rmtree(tmp, ignore_errors=True)
  return path


def token_lemmas(artifacts, language: str):
  """NlpArtifacts with empty lemmas replaced by the lower-cased token text (keywords recomputed)."""
  from presidio_analyzer.nlp_engine import NlpArtifacts
  artifacts.lemmas = [lem or tok.lower_ for lem, tok in zip(artifacts.lemmas, artifacts.tokens)]
  artifacts.keywords = NlpArtifacts.set_keywords(artifacts.nlp_engine, artifacts.lemmas, language)
  return artifacts


def blank_nlp_engine(lang: str):
  """SpacyNlpEngine on the saved blank pipeline, no NER, token text as lemmas (for context words)."""
  from presidio_analyzer.nlp_engine import NerModelConfiguration, SpacyNlpEngine

  class BlankSpacyNlpEngine(SpacyNlpEngine):
    def process_text(self, text: str, language: str):
      return token_lemmas(super().process_text(text, language), language)

    def process_batch(self, texts, language: str, batch_size: int = 1, n_process: int = 1, **kw):
      for text, artifacts in super().process_batch(texts, language, batch_size=batch_size, n_process=n_process, **kw):
        yield text, token_lemmas(artifacts, language)

  nlp = BlankSpacyNlpEngine(models=[{"lang_code": lang, "model_name": blank_pipeline_path(lang)}],
                            ner_model_configuration=NerModelConfiguration(model_to_presidio_entity_mapping={}))
  nlp.load()
  return nlp


def offline_email_recognizer(lang: str):
  import tldextract
  from presidio_analyzer.predefined_recognizers import EmailRecognizer

  class OfflineEmailRecognizer(EmailRecognizer):
    """EmailRecognizer whose domain check never fetches the public suffix list."""
    _extract = tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None)

    def validate_result(self, pattern_text: str):
      return self._extract(pattern_text).fqdn != ""

  return OfflineEmailRecognizer(supported_language=lang)


def recognizers(entities: list[str], lang: str) -> list:
  """Pattern recognizers for the requested entities."""
  from presidio_analyzer import predefined_recognizers as pr
  make = {
      "CREDIT_CARD": pr.CreditCardRecognizer, "IBAN_CODE": pr.IbanRecognizer,
      "EMAIL_ADDRESS": None, "PHONE_NUMBER": pr.PhoneRecognizer, "US_SSN": pr.UsSsnRecognizer,
      "IP_ADDRESS": pr.IpRecognizer, "URL": pr.UrlRecognizer, "CRYPTO": pr.CryptoRecognizer,
      "US_BANK_NUMBER": pr.UsBankRecognizer, "US_PASSPORT": pr.UsPassportRecognizer,
      "US_DRIVER_LICENSE": pr.UsLicenseRecognizer, "US_ITIN": pr.UsItinRecognizer,
      "UK_NHS": pr.NhsRecognizer, "MAC_ADDRESS": getattr(pr, "MacAddressRecognizer", None),
  }
  out = []
  for e in entities:
    if e == "EMAIL_ADDRESS":
      out.append(offline_email_recognizer(lang))
    elif make.get(e) is None:
      raise ValueError(f"presidio has no recognizer for {e}")
    else:
      out.append(make[e](supported_language=lang))
  return out


def recognizer_spec(r) -> dict:
  """What decides a recognizer's results: its class, entities, patterns, context words and validation knobs."""
  spec = {"class": type(r).__name__, "entities": list(r.supported_entities), "context": list(r.context or [])}
  spec["patterns"] = [[p.name, p.regex, p.score] for p in getattr(r, "patterns", None) or []]
  for k in ("supported_regions", "leniency", "replacement_pairs", "deny_list", "global_regex_flags"):
    if hasattr(r, k):
      spec[k] = repr(getattr(r, k))
  return spec


@functools.lru_cache(maxsize=None)
def recognizers_sha256(entities: tuple[str, ...], lang: str) -> str:
  """sha256 of the recognizers' definitions: the PII filter's "model" (changes when presidio's patterns do)."""
  blob = json.dumps([recognizer_spec(r) for r in recognizers(list(entities), lang)], sort_keys=True)
  return hashlib.sha256(blob.encode()).hexdigest()


class PiiFilter:
  """Scores texts for personal information; one Hit per recognized span (category = presidio entity)."""
  name = "pii"

  def __init__(self, entities: list[str], lang: str = "en"):
    from presidio_analyzer import AnalyzerEngine, RecognizerRegistry
    self.categories = tuple(entities)
    self._lang = lang
    nlp = blank_nlp_engine(lang)
    registry = RecognizerRegistry(supported_languages=[lang])
    for r in recognizers(entities, lang):
      registry.add_recognizer(r)
    self._analyzer = AnalyzerEngine(registry=registry, nlp_engine=nlp, supported_languages=[lang])

  def score_one(self, text: str) -> list[Hit]:
    res = self._analyzer.analyze(text, language=self._lang, entities=list(self.categories))
    return sorted((Hit(r.entity_type, float(r.score), int(r.start), int(r.end)) for r in res),
                  key=lambda h: (h.start, h.end, h.category))

  def score(self, texts: list[str]) -> list[list[Hit]]:
    return [self.score_one(t) for t in texts]
