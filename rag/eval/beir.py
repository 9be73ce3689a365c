"""BEIR-layout data loading and standard retrieval metrics.

Data layout (https://github.com/beir-cellar/beir): a folder with

- ``corpus.jsonl``: one ``{"_id", "title", "text"}`` object per line,
- ``queries.jsonl``: one ``{"_id", "text"}`` object per line,
- ``qrels/<split>.tsv``: tab-separated ``query-id corpus-id score`` rows, usually under a header line.

Metrics follow the definitions of ``pytrec_eval`` (trec_eval) as used by BEIR's ``EvaluateRetrieval``, with
one deliberate difference: scores are averaged over *every* judged query, and a query with no results scores 0
(trec_eval's ``-c``), so a retriever cannot look better by skipping hard queries. BEIR's quirk of dropping a
retrieved document whose id equals the query id is not applied.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kvrag.errors import InvalidInputError

__all__ = ["BeirData", "doc_text", "evaluate", "load_beir"]


@dataclass
class BeirData:
    corpus: dict[str, dict]  # doc id -> {"title": str, "text": str}
    queries: dict[str, str]  # query id -> text (only queries that have qrels)
    qrels: dict[str, dict[str, int]]  # query id -> {doc id: relevance > 0}


def doc_text(doc: Mapping) -> str:
    """The text to embed or index for a document: ``title + " " + text``, or ``text`` alone when the title is
    empty (the MTEB convention)."""
    title = doc.get("title") or ""
    text = doc.get("text") or ""
    return f"{title} {text}" if title else text


# --------------------------------------------------------------------------------------------- loading


def load_beir(
    data_dir: str | Path, *, corpus_dir: str | Path | None = None, split: str | None = None
) -> BeirData:
    """Load a BEIR-layout data set.

    ``split=None`` uses the only ``.tsv`` file in ``qrels/`` (or ``test.tsv`` when there are several).
    ``corpus_dir`` takes ``corpus.jsonl`` from another folder, for cross-lingual retrieval: the queries and
    qrels of one language against the aligned corpus of another.

    Only queries that have at least one qrels row with a score > 0 are kept; rows with a score <= 0 are
    dropped. Raises ``InvalidInputError`` naming the file (and line) when something is missing or malformed.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise InvalidInputError(f"BEIR data folder {data_dir} does not exist or is not a folder.")
    corpus_root = data_dir if corpus_dir is None else Path(corpus_dir)
    if not corpus_root.is_dir():
        raise InvalidInputError(f"corpus folder {corpus_root} does not exist or is not a folder.")

    qrels_path = _qrels_path(data_dir, split)
    corpus_path = _require_file(corpus_root / "corpus.jsonl")
    queries_path = _require_file(data_dir / "queries.jsonl")

    qrels = _read_qrels(qrels_path)
    corpus = _read_corpus(corpus_path)
    all_queries = _read_queries(queries_path)

    missing = [qid for qid in qrels if qid not in all_queries]
    if missing:
        raise InvalidInputError(
            f"{qrels_path} judges {len(missing)} quer{'y' if len(missing) == 1 else 'ies'} that "
            f"{queries_path} does not contain (e.g. {', '.join(repr(q) for q in missing[:5])}); "
            "check that the qrels split belongs to this queries file."
        )
    judged_docs = {doc_id for rels in qrels.values() for doc_id in rels}
    if judged_docs.isdisjoint(corpus):
        example = next(iter(judged_docs))
        raise InvalidInputError(
            f"none of the {len(judged_docs)} documents judged in {qrels_path} is in {corpus_path} "
            f"(e.g. {example!r}); check that the corpus belongs to these qrels"
            + (" (corpus_dir must hold a corpus with the same document ids)." if corpus_dir else ".")
        )

    queries = {qid: all_queries[qid] for qid in qrels}
    return BeirData(corpus=corpus, queries=queries, qrels=qrels)


def _require_file(path: Path) -> Path:
    if not path.is_file():
        raise InvalidInputError(
            f"missing file {path}: a BEIR data folder needs corpus.jsonl, queries.jsonl "
            "and qrels/<split>.tsv."
        )
    return path


def _qrels_path(data_dir: Path, split: str | None) -> Path:
    qrels_dir = data_dir / "qrels"
    if not qrels_dir.is_dir():
        raise InvalidInputError(f"missing folder {qrels_dir}: a BEIR data folder needs qrels/<split>.tsv.")
    available = sorted(p.stem for p in qrels_dir.glob("*.tsv") if p.is_file())
    if split is None:
        if len(available) == 1:
            split = available[0]
        elif "test" in available:
            split = "test"
        elif not available:
            raise InvalidInputError(
                f"no .tsv file in {qrels_dir}: a BEIR data folder needs qrels/<split>.tsv."
            )
        else:
            raise InvalidInputError(
                f"{qrels_dir} holds several splits ({', '.join(available)}) and none is 'test'; "
                "pass split= to choose one."
            )
    path = qrels_dir / f"{split}.tsv"
    if not path.is_file():
        raise InvalidInputError(
            f"missing file {path}: no split {split!r} in {qrels_dir} "
            f"(available: {', '.join(available) or 'none'})."
        )
    return path


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """Non-blank lines with their 1-based line numbers."""
    try:
        with path.open(encoding="utf-8-sig") as f:
            for lineno, line in enumerate(f, start=1):
                line = line.rstrip("\r\n")
                if line.strip():
                    yield lineno, line
    except UnicodeDecodeError as e:
        raise InvalidInputError(f"{path} is not UTF-8 text ({e}).") from e


def _json_objects(path: Path) -> Iterator[tuple[int, dict]]:
    for lineno, line in _lines(path):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise InvalidInputError(f"{path}, line {lineno}: not valid JSON ({e.msg}).") from e
        if not isinstance(obj, dict):
            raise InvalidInputError(
                f"{path}, line {lineno}: expected a JSON object, got {type(obj).__name__}."
            )
        yield lineno, obj


def _get_id(obj: dict, path: Path, lineno: int) -> str:
    raw = obj.get("_id")
    if isinstance(raw, bool) or not isinstance(raw, str | int) or str(raw) == "":
        raise InvalidInputError(
            f'{path}, line {lineno}: missing or invalid "_id" (expected a non-empty string).'
        )
    return str(raw)


def _get_str(obj: dict, key: str, path: Path, lineno: int, *, required: bool) -> str:
    value = obj.get(key)
    if value is None:
        if required:
            raise InvalidInputError(f'{path}, line {lineno}: missing "{key}".')
        return ""
    if not isinstance(value, str):
        raise InvalidInputError(
            f'{path}, line {lineno}: "{key}" must be a string, got {type(value).__name__}.'
        )
    return value


def _read_corpus(path: Path) -> dict[str, dict]:
    corpus: dict[str, dict] = {}
    for lineno, obj in _json_objects(path):
        doc_id = _get_id(obj, path, lineno)
        if doc_id in corpus:
            raise InvalidInputError(f"{path}, line {lineno}: duplicate document id {doc_id!r}.")
        corpus[doc_id] = {
            "title": _get_str(obj, "title", path, lineno, required=False),
            "text": _get_str(obj, "text", path, lineno, required=True),
        }
    if not corpus:
        raise InvalidInputError(f"{path} holds no documents.")
    return corpus


def _read_queries(path: Path) -> dict[str, str]:
    queries: dict[str, str] = {}
    for lineno, obj in _json_objects(path):
        qid = _get_id(obj, path, lineno)
        if qid in queries:
            raise InvalidInputError(f"{path}, line {lineno}: duplicate query id {qid!r}.")
        queries[qid] = _get_str(obj, "text", path, lineno, required=True)
    return queries


def _is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def _read_qrels(path: Path) -> dict[str, dict[str, int]]:
    qrels: dict[str, dict[str, int]] = {}
    first = True
    for lineno, line in _lines(path):
        fields = line.split("\t") if "\t" in line else line.split()
        fields = [f.strip() for f in fields]
        if first:
            first = False
            if len(fields) == 3 and not _is_number(fields[2]):
                continue  # header line, e.g. "query-id corpus-id score"
        if len(fields) != 3 or not fields[0] or not fields[1]:
            raise InvalidInputError(
                f"{path}, line {lineno}: expected 3 tab-separated fields 'query-id corpus-id score', "
                f"got {line!r}."
            )
        qid, doc_id, raw_score = fields
        try:
            score_f = float(raw_score)
        except ValueError:
            score_f = math.nan
        if not math.isfinite(score_f) or score_f != int(score_f):
            raise InvalidInputError(f"{path}, line {lineno}: score {raw_score!r} is not an integer.")
        score = int(score_f)
        if score <= 0:
            continue
        qrels.setdefault(qid, {})[doc_id] = score
    if not qrels:
        raise InvalidInputError(f"{path} holds no relevance judgement with a score > 0.")
    return qrels


# --------------------------------------------------------------------------------------------- metrics


def _dedupe(ranking: Iterable[str]) -> list[str]:
    seen: set[str] = set()
    out: list[str] = []
    for doc_id in ranking:
        if doc_id not in seen:
            seen.add(doc_id)
            out.append(doc_id)
    return out


def _dcg(gains: Sequence[float]) -> float:
    if not gains:
        return 0.0
    g = np.asarray(gains, dtype=np.float64)
    return float(np.sum(g / np.log2(np.arange(2, len(g) + 2))))


def evaluate(
    results: Mapping[str, Sequence[str]],
    qrels: Mapping[str, Mapping[str, int]],
    *,
    ks: Sequence[int] = (10, 100),
) -> dict[str, float]:
    """Mean retrieval metrics over all queries of ``qrels`` that have a relevant document.

    ``results`` maps a query id to its ranked doc ids, best first (may be shorter than k; repeated ids count
    once, at their first rank). A judged query missing from ``results`` scores 0; queries in ``results``
    but not in ``qrels`` are ignored. A document is relevant when its qrels score is > 0.

    Returns ``ndcg@k`` and ``recall@k`` for each k in ``ks``, plus ``mrr@10``, ``map@10`` and
    ``precision@10``, with pytrec_eval's definitions:

    - nDCG@k: DCG = sum(rel_i / log2(i + 1)) over ranks i = 1..k with linear gain rel_i; the ideal DCG
      takes the k highest judged relevances;
    - recall@k: relevant docs in the top k / all relevant docs;
    - precision@k: relevant docs in the top k / k;
    - MAP@k: sum of precision@i at each relevant rank i <= k / all relevant docs;
    - MRR@k: 1 / rank of the first relevant doc in the top k (0 if none).
    """
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise InvalidInputError(f"ks must hold positive cutoffs, got {list(ks)}.")
    cut_mrr = cut_map = cut_p = 10
    keys = [f"ndcg@{k}" for k in ks] + [f"recall@{k}" for k in ks]
    keys += [f"mrr@{cut_mrr}", f"map@{cut_map}", f"precision@{cut_p}"]
    max_k = max([*ks, cut_mrr, cut_map, cut_p])

    judged = {qid: {d: r for d, r in rels.items() if r > 0} for qid, rels in qrels.items()}
    judged = {qid: rels for qid, rels in judged.items() if rels}
    if not judged:
        raise InvalidInputError(
            "qrels hold no query with a relevant document (score > 0); nothing to evaluate."
        )

    totals = dict.fromkeys(keys, 0.0)
    for qid, rels in judged.items():
        ranking = _dedupe(results.get(qid, ()))[:max_k]
        gains = [rels.get(doc_id, 0) for doc_id in ranking]
        hits = [g > 0 for g in gains]
        n_rel = len(rels)
        ideal = sorted(rels.values(), reverse=True)

        for k in ks:
            idcg = _dcg(ideal[:k])
            totals[f"ndcg@{k}"] += _dcg(gains[:k]) / idcg
            totals[f"recall@{k}"] += sum(hits[:k]) / n_rel

        first = next((i for i, h in enumerate(hits[:cut_mrr]) if h), None)
        if first is not None:
            totals[f"mrr@{cut_mrr}"] += 1.0 / (first + 1)

        n_hit, ap = 0, 0.0
        for i, h in enumerate(hits[:cut_map]):
            if h:
                n_hit += 1
                ap += n_hit / (i + 1)
        totals[f"map@{cut_map}"] += ap / n_rel
        totals[f"precision@{cut_p}"] += sum(hits[:cut_p]) / cut_p

    n = len(judged)
    return {key: totals[key] / n for key in keys}
