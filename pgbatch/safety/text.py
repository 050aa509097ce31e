"""Text filters: toxicity (alt-profanity-check) and word lists with spans (safetext's multilingual lists).

Each filter holds its loaded model and exposes `score(texts) -> list[list[Hit]]`, one list per text.
"""
from __future__ import annotations

import functools
import re
from importlib import resources

from pgbatch.safety.base import Hit

# languages written without spaces between words: match word-list entries as substrings
NO_WORD_BOUNDARY = {"ch", "ja", "zh"}


class ToxicityFilter:
  """Calibrated probability that a text is toxic/vulgar (linear SVM + calibration, weights in the wheel)."""
  name = "toxicity"
  categories = ("toxicity",)

  def __init__(self):
    import profanity_check  # loads vectorizer + model from the wheel on import
    self._vectorizer = profanity_check.profanity_check.vectorizer
    self._model = profanity_check.profanity_check.model

  def score(self, texts: list[str]) -> list[list[Hit]]:
    if not texts:
      return []
    probs = self._model.predict_proba(self._vectorizer.transform(texts))[:, 1]
    return [[Hit("toxicity", float(p))] for p in probs]


def wordlist_path(lang: str) -> str:
  return str(resources.files("safetext").joinpath("languages", lang, "words.txt"))


def read_words(path: str) -> list[str]:
  with open(path, encoding="utf-8") as f:
    return sorted({w.strip().lower() for w in f if w.strip() and not w.startswith("#")}, key=lambda w: (-len(w), w))


WS = " "  # trie key of a whitespace run (matched as \\s+)


def word_keys(word: str) -> list[str]:
  """A word-list entry as trie keys: one per character, one (WS) per whitespace run."""
  return [WS if part.isspace() else ch for part in re.split(r"(\s+)", word) if part
          for ch in ([part] if part.isspace() else part)]


def fold(ch: str) -> str:
  """Case-insensitive class of a character (i and Turkish dotless ı share one): siblings of one class merge."""
  return ch if ch == WS else ch.upper()


def trie_regex(words: list[str]) -> str:
  """One regex matching exactly the entries, as a prefix trie (alternatives share prefixes: O(len) per position).

  Longer entries win: at each node the continuation is tried before the entry that ends there. Characters that
  match each other under IGNORECASE share one node (as a class like [iı]), so no sibling can shadow another.
  """
  root: dict = {}
  for w in words:
    node = root
    for ch in word_keys(w):
      node = node.setdefault(fold(ch), [set(), {}])
      node[0].add(ch)
      node = node[1]
    node[""] = None

  def atom(chars: set[str]) -> str:
    if chars == {WS}:
      return r"\s+"
    return re.escape(next(iter(chars))) if len(chars) == 1 else "[" + "".join(re.escape(c) for c in sorted(chars)) + "]"

  def emit(node: dict) -> str:
    alts = [atom(chars) + emit(child) for key, (chars, child) in sorted((k, v) for k, v in node.items() if k)]
    if not alts:
      return ""
    body = "(?:" + "|".join(alts) + ")" if len(alts) > 1 or "" in node else alts[0]
    return body + "?" if "" in node else body

  return emit(root)


def compile_wordlist(words: list[str], boundaries: bool) -> re.Pattern:
  """Case-insensitive matcher of the entries (longest first); whole words unless `boundaries` is False."""
  alt = trie_regex(words)
  return re.compile(rf"(?<!\w)(?:{alt})(?!\w)" if boundaries else f"(?:{alt})", re.IGNORECASE)


def match_spans(pattern: re.Pattern, text: str) -> list[tuple[int, int]]:
  return [(m.start(), m.end()) for m in pattern.finditer(text)]


@functools.lru_cache(maxsize=None)
def language_pattern(lang: str) -> re.Pattern:
  """The compiled matcher of one installed safetext language list (cached: compiling a large list takes ~0.1 s)."""
  return compile_wordlist(read_words(wordlist_path(lang)), lang not in NO_WORD_BOUNDARY)


class WordlistFilter:
  """Word-list matcher giving spans (category `profanity`, score 1.0) for redaction."""
  name = "wordlist"
  categories = ("profanity",)

  def __init__(self, languages: list[str]):
    self._patterns = [language_pattern(lang) for lang in sorted(set(languages))]

  def score(self, texts: list[str]) -> list[list[Hit]]:
    return [merge_hits([Hit("profanity", 1.0, s, e) for p in self._patterns for s, e in match_spans(p, t)])
            for t in texts]


def merge_hits(hits: list[Hit]) -> list[Hit]:
  """Union overlapping spans of the same category (several languages may match one word)."""
  out: list[Hit] = []
  for h in sorted(hits, key=lambda h: (h.category, h.start, -h.end)):
    if out and out[-1].category == h.category and h.start < out[-1].end:
      out[-1] = out[-1]._replace(end=max(out[-1].end, h.end), score=max(out[-1].score, h.score))
    else:
      out.append(h)
  return sorted(out, key=lambda h: (h.start, h.end))
