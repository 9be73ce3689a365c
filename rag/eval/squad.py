"""SQuAD v1.1 answer scoring (exact match and token F1 after the official normalisation) and a
reader for SQuAD-format files such as XQuAD."""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from kvrag.errors import InvalidInputError

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower case, drop ASCII punctuation and the English articles, collapse whitespace (SQuAD v1.1)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1_score(prediction: str, gold: str) -> float:
    pred = normalize_answer(prediction).split()
    ref = normalize_answer(gold).split()
    common = Counter(pred) & Counter(ref)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision = same / len(pred)
    recall = same / len(ref)
    return 2 * precision * recall / (precision + recall)


def best_score(metric, prediction: str, golds: Sequence[str]) -> float:
    """The official script takes the best score over all gold answers."""
    return max((metric(prediction, g) for g in golds), default=0.0)


@dataclass(frozen=True)
class SquadQuestion:
    id: str
    question: str
    answers: tuple[str, ...]
    paragraph_id: str  # "p<index>" in file order, as in the BEIR layout of XQuAD


@dataclass(frozen=True)
class SquadParagraph:
    id: str
    title: str
    context: str


def load_squad(path: str | Path) -> tuple[list[SquadParagraph], list[SquadQuestion]]:
    """Paragraphs (ids p0, p1, ... in file order) and questions in file order."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))["data"]
    except FileNotFoundError as exc:
        raise InvalidInputError(f"{path}: no such file") from exc
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidInputError(f"{path}: not a SQuAD-format JSON file ({exc})") from exc
    paragraphs: list[SquadParagraph] = []
    questions: list[SquadQuestion] = []
    try:
        for article in data:
            title = str(article.get("title", "")).replace("_", " ")
            for para in article["paragraphs"]:
                pid = f"p{len(paragraphs)}"
                paragraphs.append(SquadParagraph(pid, title, str(para["context"])))
                for qa in para["qas"]:
                    answers = tuple(dict.fromkeys(str(a["text"]) for a in qa["answers"]))
                    if not answers:
                        raise ValueError(f"question {qa.get('id')!r} has no answers")
                    questions.append(SquadQuestion(str(qa["id"]), str(qa["question"]), answers, pid))
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise InvalidInputError(
            f"{path}: not a SQuAD-format file (data/paragraphs/qas/answers): {exc!r}"
        ) from exc
    if not questions:
        raise InvalidInputError(f"{path}: no questions")
    return paragraphs, questions
