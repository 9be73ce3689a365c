"""Learned Matryoshka compression for any encoder: a linear map fitted on a corpus's own embeddings.

Truncating an embedding that was not trained for it (Matryoshka style) throws away whatever the
dropped coordinates held. A `MatryoshkaAdaptor` first centres the L2-normalised embeddings on the
corpus mean and maps them by a square matrix chosen so that the leading coordinates carry the most:

    pca      the principal axes by decreasing variance (orthogonal: every prefix keeps the most
             variance it can);
    learned  starts from the PCA map and trains it (torch, CPU, seeded) with a Matryoshka loss: the
             loss at every truncation dim (re-normalised), summed, with a regulariser keeping the map
             near its start. With pseudo-query pairs (below) the loss is MultipleNegativesRankingLoss:
             each pseudo-query must pick its own passage among the batch's; without them it is the
             unsupervised objective of the Matryoshka-Adaptor (Yoon et al., 2024): the similarities of
             truncated vectors should reproduce the full-dimension similarities of the originals (all
             pairs of a batch, plus a listwise term on each vector's nearest neighbours).

Pseudo-queries come from the corpus itself, no labels: each passage's title, else its first sentence
(`pseudo_query`), embedded as a query and paired with the passage's embedding; not for corpora of
source code (`pseudo_queries_suit`). Queries and passages of asymmetric encoders (e5's `query: ` /
`passage: `) sit in different regions, so a map fitted on passages alone keeps axes that queries
barely use; with the pseudo-queries both `pca` and `learned` fit the mean and the principal axes on
passages and pseudo-queries together.

The adaptor is fitted once on the corpus, saved with the index, and applied identically to passages
and queries: `transform(x, dim)` = normalise(truncate((normalise(x) - mean) @ matrix, dim)).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from kvrag.encoders.codetext import defines_code
from kvrag.encoders.compress import normalize, truncate
from kvrag.errors import CorruptIndexError, DimensionMismatchError, InvalidInputError

AdaptorMethod = Literal["none", "pca", "learned"]
ADAPTOR_METHODS: tuple[str, ...] = ("none", "pca", "learned")
DEFAULT_DIMS: tuple[int, ...] = (384, 256, 128, 64)


def check_method(method: str) -> str:
    """The method itself, or InvalidInputError naming the accepted ones."""
    if method not in ADAPTOR_METHODS:
        raise InvalidInputError(f"unknown adaptor {method!r}: use {', '.join(ADAPTOR_METHODS)}")
    return method


@dataclass(frozen=True)
class LearnedFit:
    """Training options of the `learned` map (defaults: 10-30 s on 5k x 384 vectors, one CPU thread).

    `dim_weights` weights each truncation dim's loss (by default small dims count more, since they
    lose the most). With pseudo-queries each step ranks `batch` pairs at cosine `scale`; without,
    `topk` neighbours per row enter the listwise term at `temperature`."""

    dims: tuple[int, ...] = DEFAULT_DIMS
    dim_weights: tuple[float, ...] | None = None
    steps: int = 300
    batch: int = 512
    lr: float = 1e-3
    topk: int = 10
    temperature: float = 0.2
    pairwise_weight: float = 1.0
    topk_weight: float = 1.0
    reg_weight: float = 0.1
    scale: float = 20.0  # cosine scale of the pseudo-query ranking loss
    seed: int = 0

    def weights(self, dims: tuple[int, ...], full: int) -> tuple[float, ...]:
        """One loss weight per trained dim (the full dim is always trained, weighted 1 by default)."""
        if self.dim_weights is None:
            return tuple(float(full) / d for d in dims)
        if len(self.dim_weights) != len(self.dims):
            raise InvalidInputError("dim_weights needs one weight per entry of dims")
        by_dim = dict(zip(self.dims, self.dim_weights, strict=True))
        return tuple(float(by_dim.get(d, 1.0)) for d in dims)


@dataclass
class MatryoshkaAdaptor:
    """Centering plus a square linear map applied before Matryoshka truncation."""

    method: str
    mean: np.ndarray  # (D,) float32, the corpus mean of the normalised embeddings
    matrix: np.ndarray  # (D, D) float32, applied as (x - mean) @ matrix
    info: dict = field(default_factory=dict)  # how it was fitted (samples, losses); reported, not used

    def __post_init__(self) -> None:
        check_method(self.method)
        self.mean = np.asarray(self.mean, dtype=np.float32)
        self.matrix = np.asarray(self.matrix, dtype=np.float32)
        d = self.mean.shape[0] if self.mean.ndim == 1 else -1
        if self.method == "none" or self.matrix.shape != (d, d):
            raise InvalidInputError(
                f"an adaptor needs a (D,) mean and a (D, D) matrix, got {self.mean.shape} and "
                f"{self.matrix.shape} for method {self.method!r}"
            )

    @property
    def dim(self) -> int:
        """The input (and full output) dimension."""
        return int(self.mean.shape[0])

    # -- fitting --------------------------------------------------------------------------------
    @classmethod
    def fit(
        cls,
        x: np.ndarray,
        method: AdaptorMethod = "pca",
        *,
        queries: np.ndarray | None = None,
        learned: LearnedFit | None = None,
        max_samples: int = 20_000,
        seed: int = 0,
    ) -> MatryoshkaAdaptor:
        """Fit on corpus embeddings `x`. `queries` (optional): pseudo-query embeddings, row i paired
        with `x[i]` (see `pseudo_query`). `method="none"` is not an adaptor: use None."""
        check_method(method)
        if method == "none":
            raise InvalidInputError("adaptor 'none' has nothing to fit: use no adaptor instead")
        x = _check_fit_input(x, "embeddings to fit an adaptor on")
        if len(x) < 2:
            raise InvalidInputError("an adaptor needs a 2-D array of at least two embeddings to fit on")
        if queries is not None:
            queries = _check_fit_input(queries, "pseudo-query embeddings")
            if queries.shape != x.shape:
                raise InvalidInputError(
                    f"pseudo-queries {queries.shape} must pair row for row with the embeddings {x.shape}"
                )
        if len(x) > max_samples:
            keep = np.random.default_rng(seed).choice(len(x), max_samples, replace=False)
            x = x[keep]
            queries = queries[keep] if queries is not None else None
        both = x if queries is None else np.concatenate([x, queries])
        mean = both.mean(axis=0)
        centered = (both - mean).astype(np.float64)
        eigvals, eigvecs = np.linalg.eigh(centered.T @ centered)
        pca = eigvecs[:, np.argsort(-eigvals, kind="stable")]
        # fix each axis's sign (eigh's is arbitrary) so a fit is reproducible across LAPACK builds
        pca *= np.where(pca[np.abs(pca).argmax(axis=0), np.arange(pca.shape[1])] < 0, -1.0, 1.0)
        info: dict = {"samples": len(x), "pseudo_queries": 0 if queries is None else len(queries)}
        if method == "pca":
            return cls("pca", mean, pca.astype(np.float32), info)
        opts = learned or LearnedFit()
        if queries is None:
            matrix, info["losses"] = _train(x, mean, pca.astype(np.float32), opts)
        else:
            matrix, info["losses"] = _train_pairs(queries, x, mean, pca.astype(np.float32), opts)
        info["objective"] = "unsupervised" if queries is None else "pseudo-query ranking"
        return cls("learned", mean, matrix, info)

    # -- applying -------------------------------------------------------------------------------
    def transform(self, x: np.ndarray, dim: int | None = None) -> np.ndarray:
        """Adapted, truncated to `dim` (None: all D) and re-normalised embeddings, float32."""
        x = np.asarray(x, dtype=np.float32)
        if x.shape[-1] != self.dim:
            raise DimensionMismatchError(
                f"embeddings have dimension {x.shape[-1]}, the adaptor expects {self.dim}: give the "
                "encoder's full (untruncated) embeddings"
            )
        return truncate((normalize(x) - self.mean) @ self.matrix, dim)

    # -- persistence ----------------------------------------------------------------------------
    def to_json(self) -> dict:
        """The JSON fields saved beside the matrix (the mean as float32 values round-trips exactly)."""
        return {"method": self.method, "dim": self.dim, "mean": self.mean.tolist()}

    @classmethod
    def from_json(cls, data: dict, matrix: np.ndarray) -> MatryoshkaAdaptor:
        """Rebuild from `to_json()` fields and the matrix; CorruptIndexError when they disagree."""
        try:
            out = cls(str(data["method"]), np.asarray(data["mean"], dtype=np.float32), matrix)
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptIndexError(f"saved adaptor cannot be read back ({exc}): refit it") from exc
        if out.dim != int(data.get("dim", out.dim)):
            raise CorruptIndexError(f"saved adaptor says dim {data['dim']} but holds {out.dim}: refit it")
        return out

    def save(self, directory: str | Path) -> Path:
        """Write `adaptor.npy` (the matrix) and `adaptor.json` into `directory`, each atomically."""
        from kvrag.atomic import write_json, write_npy

        folder = Path(directory)
        folder.mkdir(parents=True, exist_ok=True)
        write_npy(folder / "adaptor.npy", self.matrix)
        write_json(folder / "adaptor.json", {**self.to_json(), "matrix": "adaptor.npy"})
        return folder

    @classmethod
    def load(cls, directory: str | Path) -> MatryoshkaAdaptor:
        """Read what `save` wrote (no pickle: the matrix is a plain .npy)."""
        folder = Path(directory)
        try:
            data = json.loads((folder / "adaptor.json").read_text(encoding="utf-8"))
            matrix = np.load(folder / data["matrix"], allow_pickle=False)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CorruptIndexError(f"no readable adaptor in {folder} ({exc}): refit it") from exc
        return cls.from_json(data, matrix)


_SENTENCE_END = re.compile(r"(?<=[.!?。！？])\s+")


def pseudo_query(text: str, title: str | None = None, max_words: int = 32) -> str:
    """A query-like line for a passage, from the passage alone: its title when it has one, else its
    first sentence (or first line), at most `max_words` words. Empty when the passage is empty."""
    head = (title or "").strip()
    if not head:
        body = text.strip()
        first_line = body.split("\n", 1)[0]
        head = _SENTENCE_END.split(first_line, maxsplit=1)[0]
    return " ".join(head.split()[:max_words])


def pseudo_queries_suit(texts: Sequence[str], kinds: Sequence[str | None] | None = None) -> bool:
    """Whether pseudo-queries should calibrate an index of these passages: yes for prose, no when
    most passages are source code (kind `code`, or, kind unknown, text that defines a Python function
    or class). A code passage's likely pseudo-queries (its docstring, its first line) sit verbatim in
    it, so pairs teach the map word overlap, not what searches need: on CoSQA every kind of
    pseudo-query made the fitted adaptors worse than passages alone (docs/benchmarks.md)."""
    kinds = list(kinds) if kinds is not None else [None] * len(texts)
    if len(kinds) != len(texts):
        raise InvalidInputError(f"{len(kinds)} kinds for {len(texts)} passages")
    code = sum(1 for t, k in zip(texts, kinds, strict=True) if k == "code" or (k is None and defines_code(t)))
    return 2 * code <= len(texts)


def encode_pseudo_queries(
    encoder,
    passages: Iterable[tuple[str, str | None]],
    *,
    dim: int | None = None,
    show_progress: bool = False,
) -> np.ndarray:
    """Query embeddings of the pseudo-queries of (text, title) passages, row for row (an empty
    passage gets a placeholder: encoders refuse empty text)."""
    texts = [pseudo_query(text, title) or "-" for text, title in passages]
    return encoder.encode(texts, kind="query", dim=dim, show_progress=show_progress)


def _check_fit_input(x: np.ndarray, what: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise InvalidInputError(f"{what} must be a 2-D array, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise InvalidInputError(f"{what} contain NaN or infinite values")
    return normalize(x)


def similarity_preservation(x: np.ndarray, adaptor: MatryoshkaAdaptor | None, dim: int, k: int = 10) -> float:
    """Mean overlap of each vector's k nearest neighbours (cosine) at full dimension and after
    adapting and truncating to `dim` (1.0: identical neighbourhoods). A quick unsupervised check."""
    x = normalize(x)
    full = x @ x.T
    y = adaptor.transform(x, dim) if adaptor is not None else truncate(x, dim)
    low = y @ y.T
    np.fill_diagonal(full, -np.inf)
    np.fill_diagonal(low, -np.inf)
    a = np.argpartition(-full, k, axis=1)[:, :k]
    b = np.argpartition(-low, k, axis=1)[:, :k]
    return float(np.mean([len(set(p) & set(q)) / k for p, q in zip(a.tolist(), b.tolist(), strict=True)]))


def _optimise(start: np.ndarray, n: int, opts: LearnedFit, batch: int, batch_loss) -> tuple[np.ndarray, list]:
    """Adam on the map from `start`: each step draws `batch` of `n` rows (seeded) and minimises
    `batch_loss(idx, w)` plus a regulariser keeping the map near `start`. Returns the map and the mean
    loss of the first and last tenth of steps."""
    import torch

    gen = torch.Generator().manual_seed(opts.seed)
    w0 = torch.from_numpy(start.copy())
    w = torch.nn.Parameter(w0.clone())
    optim = torch.optim.Adam([w], lr=opts.lr)
    losses: list[float] = []
    for _ in range(opts.steps):
        idx = torch.randperm(n, generator=gen)[:batch]
        loss = opts.reg_weight * ((w - w0) ** 2).sum() / start.shape[0] + batch_loss(idx, w)
        optim.zero_grad()
        loss.backward()
        optim.step()
        losses.append(float(loss.detach()))
    tenth = max(1, len(losses) // 10)
    return w.detach().numpy().astype(np.float32), [
        round(float(np.mean(losses[:tenth])), 5),
        round(float(np.mean(losses[-tenth:])), 5),
    ]


def _trained_dims(opts: LearnedFit, d_full: int) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """The truncation dims a fit trains (the full dim always among them), largest first, and their weights."""
    dims = tuple(sorted({d for d in opts.dims if 0 < d <= d_full} | {d_full}, reverse=True))
    return dims, opts.weights(dims, d_full)


def _train(x: np.ndarray, mean: np.ndarray, start: np.ndarray, opts: LearnedFit) -> tuple[np.ndarray, list]:
    """Unsupervised: truncated similarities should reproduce the full-dimension ones (pairwise) and
    keep each row's true top-k neighbours on top (listwise)."""
    import torch

    n, d_full = x.shape
    if opts.steps < 1 or opts.batch < 2 or opts.topk < 1 or opts.temperature <= 0:
        raise InvalidInputError("learned adaptor: steps >= 1, batch >= 2, topk >= 1 and temperature > 0")
    dims, weights = _trained_dims(opts, d_full)
    xs = torch.from_numpy(np.ascontiguousarray(x))
    centered = torch.from_numpy(np.ascontiguousarray(x - mean))
    batch, k = min(opts.batch, n), min(opts.topk, n - 1)
    eye = torch.eye(batch, dtype=torch.bool)
    off = (~eye).float()

    def batch_loss(idx, w):
        target = _standardise(xs[idx] @ xs[idx].T, off)
        top = target.masked_fill(eye, -torch.inf).topk(k, dim=1).indices
        p_true = torch.softmax(target.gather(1, top) / opts.temperature, dim=1)
        z = centered[idx] @ w
        loss = z.new_zeros(())
        for dim, weight in zip(dims, weights, strict=True):
            zd = torch.nn.functional.normalize(z[:, :dim], dim=1)
            sim = _standardise(zd @ zd.T, off)
            pairwise = ((sim - target) ** 2).sum() / (batch * (batch - 1))
            logp = torch.log_softmax(sim.masked_fill(eye, -torch.inf) / opts.temperature, dim=1)
            listwise = -(p_true * logp.gather(1, top)).sum(dim=1).mean()
            loss = loss + weight * (opts.pairwise_weight * pairwise + opts.topk_weight * listwise)
        return loss

    return _optimise(start, n, opts, batch, batch_loss)


def _train_pairs(
    q: np.ndarray, p: np.ndarray, mean: np.ndarray, start: np.ndarray, opts: LearnedFit
) -> tuple[np.ndarray, list]:
    """Supervised by pseudo-queries: at every truncation dim pseudo-query i should rank passage i
    first among a batch of passages (MultipleNegativesRankingLoss on re-normalised truncations)."""
    import torch
    import torch.nn.functional as F

    n, d_full = p.shape
    if opts.steps < 1 or opts.batch < 2 or opts.scale <= 0:
        raise InvalidInputError("learned adaptor: steps >= 1, batch >= 2 and scale > 0")
    dims, weights = _trained_dims(opts, d_full)
    qc = torch.from_numpy(np.ascontiguousarray(q - mean))
    pc = torch.from_numpy(np.ascontiguousarray(p - mean))
    batch = min(opts.batch, n)
    target = torch.arange(batch)

    def batch_loss(idx, w):
        zq, zp = qc[idx] @ w, pc[idx] @ w
        loss = zq.new_zeros(())
        for dim, weight in zip(dims, weights, strict=True):
            sim = F.normalize(zq[:, :dim], dim=1) @ F.normalize(zp[:, :dim], dim=1).T
            loss = loss + weight * F.cross_entropy(opts.scale * sim, target)
        return loss

    return _optimise(start, n, opts, batch, batch_loss)


def _standardise(sim, off):
    """Each row's off-diagonal similarities shifted and scaled to mean 0, variance 1: rankings and
    relative gaps are what retrieval uses, so a per-row affine change costs nothing."""
    import torch

    n = sim.shape[1] - 1
    mu = (sim * off).sum(dim=1, keepdim=True) / n
    dev = (sim - mu) * off
    sd = torch.sqrt((dev**2).sum(dim=1, keepdim=True) / n + 1e-12)
    return dev / sd
