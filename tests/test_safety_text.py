"""Text filters on deterministic fixtures: PII spans in OCR-like text, word-list spans, toxicity scores.

Fixtures are test values only: a Luhn-valid test card, a published example IBAN, a generated valid-format
SSN, example.com addresses, a 555 phone number; profane strings are mild and constructed.
"""
import os
import random
import re

import pytest

from pgbatch.safety import SafetyPolicy, decide_row, load_filter, score_text
from pgbatch.safety.policy import WORDLIST_LANGUAGES
from pgbatch.safety.text import NO_WORD_BOUNDARY, compile_wordlist, language_pattern, read_words, wordlist_path
from tests.safety_offline import no_network

CARD, IBAN, SSN = "4111 1111 1111 1111", "GB82 WEST 1234 5698 7654 32", "512-38-4476"
EMAIL, PHONE, IP = "jane.doe@example.com", "+1 212-555-0198", "192.168.10.4"
OCR = (f"ACME HARDWARE STORE\nVISA {CARD}\nRefund to IBAN {IBAN}\n"
       f"Questions? {EMAIL} or {PHONE}\nSSN on file {SSN}\nPOS host {IP}\nTHANK YOU")
RAW = {"CREDIT_CARD": CARD, "IBAN_CODE": IBAN, "US_SSN": SSN, "EMAIL_ADDRESS": EMAIL, "PHONE_NUMBER": PHONE,
       "IP_ADDRESS": IP}


@pytest.fixture(scope="module")
def offline(tmp_path_factory):
  """No sockets for the whole module, and an empty cache dir: the blank spaCy pipeline must be created, not
  downloaded; word lists, the toxicity model and the e-mail suffix list come from installed files."""
  mp = pytest.MonkeyPatch()
  cache = tmp_path_factory.mktemp("cache")
  mp.setenv("PGBATCH_CACHE_DIR", str(cache))
  with no_network() as attempts:
    yield cache
  mp.undo()
  assert attempts == []


@pytest.fixture(scope="module")
def filters(offline):
  p = SafetyPolicy.model_validate({"wordlist": {"languages": ["en", "de", "es", "fr"]}})
  return p, {n: load_filter(n, p) for n in ("toxicity", "wordlist", "pii")}


def test_blank_spacy_pipeline_saved_offline(filters, offline):
  (saved,) = [d for d in os.listdir(offline) if d.startswith("spacy-blank-en-")]
  assert os.path.isfile(os.path.join(offline, saved, "config.cfg"))


def test_pii_spans_in_ocr_text(filters):
  _, fs = filters
  hits = fs["pii"].score([OCR])[0]
  found = {h.category: OCR[h.start:h.end] for h in hits if h.category != "URL"}
  assert found == RAW
  assert {h.category for h in hits} <= set(RAW) | {"URL"}


def test_pii_validation_rejects_invalid_values(filters):
  _, fs = filters
  bad = "card 4111 1111 1111 1112 iban GB82 WEST 1234 5698 7654 33 ssn 000-12-3456"
  assert {h.category for h in fs["pii"].score([bad])[0]} <= {"PHONE_NUMBER"}


def test_redaction_placeholders_and_decision(filters):
  p, fs = filters
  findings = score_text([OCR], p, "ocr.text", filters=fs)[0]
  decision, written, rec = decide_row(findings, p, {"ocr.text": OCR}, p.digest())
  out = written["ocr.text"]
  assert decision == "redacted"
  for cat, raw in RAW.items():
    assert raw not in out and f"[{cat}]" in out
  assert out.startswith("ACME HARDWARE STORE\nVISA [CREDIT_CARD]\nRefund to IBAN [IBAN_CODE]\n")
  assert out.endswith("SSN on file [US_SSN]\nPOS host [IP_ADDRESS]\nTHANK YOU")
  for f in rec["findings"]:
    assert f["score"] >= f["threshold"]
    if f["action"] == "redact":
      assert out[f["start"]:f["end"]] == f"[{f['category']}]"
  assert {f["category"] for f in rec["findings"] if f["action"] == "redact"} == set(RAW)


def test_wordlist_spans_multilingual(filters):
  _, fs = filters
  texts = ["What a load of crap, said the sign.", "Du Depp!", "Eres un idiota.", "Quel imbécile.",
           "A scrappy dog on a crappie boat."]
  spans = [[t[h.start:h.end] for h in hits] for t, hits in zip(texts, fs["wordlist"].score(texts))]
  assert spans == [["crap"], ["Depp"], ["idiota"], ["imbécile"], []]


def test_toxicity_scores_in_range_and_ordered(filters):
  _, fs = filters
  benign, rude = [h[0].score for h in fs["toxicity"].score(["a cup of coffee on a saucer", "you stupid idiot"])]
  assert 0.0 <= benign < 0.2 and 0.9 < rude <= 1.0


def test_mild_profanity_is_redacted_and_flagged(filters):
  p, fs = filters
  text = "Caption: what a crap day, you idiot."
  decision, written, rec = decide_row(score_text([text], p, "caption.text", filters=fs)[0], p,
                                      {"caption.text": text}, "d")
  assert decision == "redacted"
  assert written["caption.text"] == "Caption: what a [PROFANITY] day, you [PROFANITY]."
  assert {(f["filter"], f["action"]) for f in rec["findings"]} == {("wordlist", "redact"), ("toxicity", "flag")}


VALID = [  # (category, value): test card numbers, published example IBANs, reserved/fictional numbers
    ("CREDIT_CARD", "4111 1111 1111 1111"), ("CREDIT_CARD", "5555 5555 5555 4444"),
    ("CREDIT_CARD", "3782 822463 10005"), ("CREDIT_CARD", "6011111111111117"),
    ("IBAN_CODE", "GB82 WEST 1234 5698 7654 32"), ("IBAN_CODE", "DE89 3704 0044 0532 0130 00"),
    ("IBAN_CODE", "FR14 2004 1010 0505 0001 3M02 606"), ("IBAN_CODE", "NL91ABNA0417164300"),
    ("PHONE_NUMBER", "+44 20 7946 0958"), ("PHONE_NUMBER", "(212) 555-0198"), ("PHONE_NUMBER", "+49 30 901820"),
    ("EMAIL_ADDRESS", "jane.doe@example.com"), ("EMAIL_ADDRESS", "x.y@mail.example.co.uk"),
    ("IP_ADDRESS", "10.0.0.1"), ("IP_ADDRESS", "2001:db8::ff00:42:8329"),
]
INVALID = [  # the same shapes failing their validation (Luhn, IBAN mod-97, SSN rules, octets, TLD, length)
    ("CREDIT_CARD", "4111 1111 1111 1112"), ("CREDIT_CARD", "5555 5555 5555 4445"),
    ("IBAN_CODE", "GB82 WEST 1234 5698 7654 33"), ("IBAN_CODE", "DE89 3704 0044 0532 0130 01"),
    ("US_SSN", "000-12-3456"), ("US_SSN", "666-12-3456"), ("US_SSN", "123-00-4567"), ("US_SSN", "123-45-0000"),
    ("IP_ADDRESS", "999.1.1.1"), ("EMAIL_ADDRESS", "a@b.c"), ("PHONE_NUMBER", "212-555-01"),
]


@pytest.mark.parametrize("category,value", VALID)
def test_pii_valid_values_found_with_exact_span(filters, category, value):
  p, fs = filters
  text = f"Receipt — {value} — thank you"
  hits = [h for h in fs["pii"].score([text])[0] if h.category == category]
  assert [text[h.start:h.end] for h in hits] == [value]
  assert hits[0].score >= p.pii.rule(category)[0]


@pytest.mark.parametrize("category,value", INVALID)
def test_pii_invalid_values_rejected(filters, category, value):
  _, fs = filters
  text = f"Receipt — {value} — thank you"
  assert category not in {h.category for h in fs["pii"].score([text])[0]}


def generated_ssns(n: int, seed: int = 0) -> list[str]:
  """Valid-format SSNs: area 001-899 except 666, group 01-99, serial 0001-9999 (not the canonical samples)."""
  rng = random.Random(seed)
  out = []
  while len(out) < n:
    area, group, serial = rng.randint(1, 899), rng.randint(1, 99), rng.randint(1, 9999)
    if area != 666 and len({*f"{area:03d}{group:02d}{serial:04d}"}) > 1:
      out.append(f"{area:03d}-{group:02d}-{serial:04d}")
  return out


def test_generated_ssns_and_context_words(filters):
  p, fs = filters
  t = p.pii.rule("US_SSN")[0]
  ssns = generated_ssns(12)
  texts = [f"Employee form. SSN: {v}. Signed." for v in ssns]
  for text, v, hits in zip(texts, ssns, fs["pii"].score(texts)):
    (h,) = [h for h in hits if h.category == "US_SSN"]
    assert text[h.start:h.end] == v and h.score >= t
  digits = ssns[0].replace("-", "")  # a bare 9-digit number is an SSN only next to a context word
  (with_ctx,), (without,) = [[h for h in hits if h.category == "US_SSN"] for hits in
                             fs["pii"].score([f"social security number {digits}", f"order no {digits}"])]
  assert with_ctx.score >= t > without.score


def test_pii_other_language_pipeline_offline(offline):
  p = SafetyPolicy.model_validate({"pii": {"language": "de"}})
  text = "Rechnung\nIBAN DE89 3704 0044 0532 0130 00\nTel. +49 30 901820\nE-Mail: max.muster@example.de"
  hits = load_filter("pii", p).score([text])[0]
  assert {h.category: text[h.start:h.end] for h in hits if h.category != "URL"} == {
      "IBAN_CODE": "DE89 3704 0044 0532 0130 00", "PHONE_NUMBER": "+49 30 901820",
      "EMAIL_ADDRESS": "max.muster@example.de"}
  assert any(d.startswith("spacy-blank-de-") for d in os.listdir(offline))
  with pytest.raises(ValueError, match="pii.language"):
    SafetyPolicy.model_validate({"pii": {"language": "zz"}})


def test_redaction_offsets_with_non_bmp_text_and_overlaps(filters):
  p, fs = filters
  text = f"🚗🅿️ crap! pay to {IBAN} 👍 or mail {EMAIL}"
  decision, written, rec = decide_row(score_text([text], p, "ocr.text", filters=fs)[0], p, {"ocr.text": text}, "d")
  out = written["ocr.text"]
  assert decision == "redacted" and out == "🚗🅿️ [PROFANITY]! pay to [IBAN_CODE] 👍 or mail [EMAIL_ADDRESS]"
  redacted = [(f["category"], out[f["start"]:f["end"]]) for f in rec["findings"] if f["action"] == "redact"]
  assert sorted(redacted) == [("EMAIL_ADDRESS", "[EMAIL_ADDRESS]"), ("IBAN_CODE", "[IBAN_CODE]"),
                              ("profanity", "[PROFANITY]")]
  flagged = [f for f in rec["findings"] if f["action"] == "flag"]  # URL inside the e-mail: span = the placeholder
  assert all(out[f["start"]:f["end"]] == "[EMAIL_ADDRESS]" for f in flagged if f["category"] == "URL")


def test_wordlist_case_whitespace_and_unspaced_scripts(offline):
  en_words = read_words(wordlist_path("en"))
  multi = next(w for w in en_words if " " in w)  # taken from the installed list: no such word in the repo
  zh = next(w for w in read_words(wordlist_path("zh")) if len(w) >= 2)
  p = SafetyPolicy.model_validate({"wordlist": {"languages": ["en", "zh"]}})
  f = load_filter("wordlist", p)
  spaced = multi.upper().replace(" ", "  \n ")
  texts = [f"Sign reads: {spaced}.", f"路牌上写着{zh}和别的字", "Crapshoot? no: CRAP."]
  spans = [[t[h.start:h.end] for h in hits] for t, hits in zip(texts, f.score(texts))]
  assert spans == [[spaced], [zh], ["CRAP"]]


def naive_pattern(words: list[str], boundaries: bool) -> re.Pattern:
  alt = "|".join(re.escape(w).replace(r"\ ", r"\s+") for w in words)  # longest first: the reference semantics
  return re.compile(rf"(?<!\w)(?:{alt})(?!\w)" if boundaries else f"(?:{alt})", re.IGNORECASE)


@pytest.mark.parametrize("lang", WORDLIST_LANGUAGES)
def test_trie_wordlist_matches_plain_alternation(lang):
  words = read_words(wordlist_path(lang))
  rng = random.Random(lang)
  filler = "the sign on a street near people walking ein der la el un le".split()
  texts = []
  for _ in range(150):
    parts = [rng.choice(filler) for _ in range(rng.randint(2, 6))]
    for w in rng.sample(words, 2):
      w = rng.choice([w, w.upper(), w + "s", w[:-1], "x" + w, w.title()])
      parts.insert(rng.randint(0, len(parts)), w)
    texts.append(rng.choice([" ", ""]).join(parts))
  boundaries = lang not in NO_WORD_BOUNDARY
  fast, ref = language_pattern(lang), naive_pattern(words, boundaries)
  for t in texts:
    assert [m.span() for m in fast.finditer(t)] == [m.span() for m in ref.finditer(t)], t


def test_trie_merges_case_folded_siblings():
  # Under IGNORECASE "i" also matches Turkish dotless "ı": unmerged siblings would stop at the shorter entry.
  words = sorted(["kit", "kıt xyz", "kıtten"], key=lambda w: (-len(w), w))
  text = "a KIT XYZ, a kıt  xyz and a kitten kıtten"
  fast, ref = compile_wordlist(words, True), naive_pattern(words, True)
  assert [m.group() for m in fast.finditer(text)] == [m.group() for m in ref.finditer(text)] == [
      "KIT XYZ", "kıt  xyz", "kitten", "kıtten"]
