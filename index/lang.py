"""A small language guesser for passages: Unicode script first, then function words for Latin text.

Good enough to fill the passage `lang` column for metadata filters (`{"lang": "de"}`); documents
that state their language (JSONL `lang` field) are never guessed.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter

_SCRIPTS = (  # (Unicode name prefix, language) for scripts that identify a language well enough
    ("CJK UNIFIED", "zh"),
    ("HIRAGANA", "ja"),
    ("KATAKANA", "ja"),
    ("HANGUL", "ko"),
    ("DEVANAGARI", "hi"),
    ("ARABIC", "ar"),
    ("CYRILLIC", "ru"),
    ("GREEK", "el"),
    ("HEBREW", "he"),
    ("THAI", "th"),
    ("BENGALI", "bn"),
    ("TAMIL", "ta"),
)
_FUNCTION_WORDS = {
    "en": "the and of to is in that it for are with as on this be by from or",
    "de": "der die das und ist nicht ein eine zu den mit sich des auf für im dem von",
    "fr": "le la les et est des une un du que en pour dans sur qui au pas avec",
    "es": "el la los las y es de que en un una por con para se del al como",
    "it": "il di che la è e un una per non sono del della con gli le",
    "pt": "o a os as e é de que um uma do da em para com não no na",
    "nl": "de het een en van is dat op te in niet met zijn voor",
}
_WORDS = {lang: set(ws.split()) for lang, ws in _FUNCTION_WORDS.items()}
_WORD_RE = re.compile(r"[^\W\d_]+", re.UNICODE)


def guess_language(text: str) -> str | None:
    """ISO 639-1 code of the text's most likely language, or None when there is too little signal."""
    letters = [c for c in text[:4000] if c.isalpha()]
    if not letters:
        return None
    scripts: Counter[str] = Counter()
    for c in letters:
        name = unicodedata.name(c, "")
        for prefix, lang in _SCRIPTS:
            if name.startswith(prefix):
                scripts[lang] += 1
                break
        else:
            scripts["latin" if "LATIN" in name else "other"] += 1
    if scripts.get("ja"):  # kana marks Japanese even among Han characters
        scripts["ja"] += scripts.pop("zh", 0)
    script, count = scripts.most_common(1)[0]
    if script not in ("latin", "other"):
        return script if count >= 0.3 * len(letters) else None
    if script == "other":
        return None
    words = [w.lower() for w in _WORD_RE.findall(text[:4000])]
    scores = {lang: sum(w in vocab for w in words) for lang, vocab in _WORDS.items()}
    best = max(scores, key=scores.get)  # type: ignore[arg-type]
    return best if scores[best] >= 2 else None
