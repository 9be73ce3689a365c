"""Crash safety of an upsert: kill -9 a writer upserting 150 documents at 20 random moments; after
`recover`, every stored document is fully searchable (all its passages live in the vector index and
in BM25, in memory and as saved) or absent, never in between (tiny random encoder)."""

from __future__ import annotations

import contextlib
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import pytest

from kvrag.index.collection import Collection, CollectionConfig
from kvrag.index.hybrid import BM25Index
from kvrag.index.ingest import embed_text
from kvrag.index.job import recover
from kvrag.index.vector import VectorIndex

sys.path.insert(0, str(Path(__file__).parent))
from upsert_child import DOCS, round_documents  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
UPSERT_CHILD = Path(__file__).with_name("upsert_child.py")
NAME = "c"
KILLS = 20
SPREAD = 1.2  # kill moments spread over 1.2 times a whole round, so a few land after it is done
EXACT_SAMPLE = 48  # passages of each round looked up by an exact search of their own embedding
HYBRID_SAMPLE = 4  # passages of each round looked up by hybrid search
FULL_LOAD_EVERY = 5  # every 5th kill, the saved indexes are loaded whole, not only their id maps
# generous bounds for a loaded machine; each is far above what the step takes when all is well
READY_S, STARTED_S, DONE_S, EXITED_S = 300, 60, 180, 60


class Writers:
    """The upsert_child process, which forks one writer per round and kills it on request: its
    output lines, timestamped, and its stderr, drained all along so that a full pipe never blocks
    it or a writer."""

    def __init__(self, model_dir: Path, home: Path):
        self.proc = subprocess.Popen(
            [sys.executable, str(UPSERT_CHILD), str(model_dir), str(home), NAME],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
            errors="replace",
        )
        self.lines: queue.Queue[tuple[float, str]] = queue.Queue()
        self.recent: list[str] = []  # the last lines read, for error messages
        self.err: list[str] = []
        self.writer: int | None = None
        self.threads = [
            threading.Thread(target=self._read, daemon=True),
            threading.Thread(target=self._drain, daemon=True),
        ]
        for t in self.threads:
            t.start()

    def _read(self) -> None:
        try:
            for line in self.proc.stdout:  # type: ignore[union-attr]
                self.lines.put((time.perf_counter(), line.strip()))
        finally:
            self.lines.put((time.perf_counter(), "eof"))

    def _drain(self) -> None:
        for chunk in iter(lambda: self.proc.stderr.read(4096), ""):  # type: ignore[union-attr]
            self.err.append(chunk)

    def stderr(self, limit: int = 4000) -> str:
        return "".join(self.err)[-limit:]

    def _failure(self, what: str) -> AssertionError:
        state = "running" if self.proc.poll() is None else f"ended with {self.proc.returncode}"
        return AssertionError(
            f"{what} (upsert_child {state}, writer {self.writer})\nlast lines: {self.recent[-12:]}\n"
            f"stderr:\n{self.stderr()}"
        )

    def expect(
        self, word: str, timeout: float, seen: list[tuple[float, str]] | None = None
    ) -> tuple[float, list[str]]:
        """Wait for a line starting with `word`: (when it came, its other words); the lines before
        it go to `seen`, timestamped."""
        deadline = time.perf_counter() + timeout
        while True:
            try:
                t, line = self.lines.get(timeout=max(0.0, deadline - time.perf_counter()))
            except queue.Empty:
                raise self._failure(f"no {word!r} from upsert_child within {timeout} s") from None
            if line == "eof":
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout=10)
                self.threads[1].join(timeout=5)
                raise self._failure(f"upsert_child closed its stdout while {word!r} was awaited")
            self.recent = [*self.recent[-11:], line]
            words = line.split()
            if words and words[0] == word:
                return t, words[1:]
            if seen is not None and words:
                seen.append((t, line))

    def send(self, command: str) -> None:
        self.proc.stdin.write(command + "\n")  # type: ignore[union-attr]
        self.proc.stdin.flush()  # type: ignore[union-attr]

    def start(self, rnd: int) -> float:
        self.send(f"upsert {rnd}")
        t, (pid,) = self.expect("started", STARTED_S)
        self.writer = int(pid)
        return t

    def kill(self) -> tuple[int, list[tuple[float, str]]]:
        """Have the running writer SIGKILLed by its parent (which alone reaps it, so the pid is
        still the writer's); returns its wait status and what it printed, timestamped. A writer
        that exited by itself before is reported with its own status."""
        self.send("kill")
        seen: list[tuple[float, str]] = []
        _, (pid, status) = self.expect("exited", EXITED_S, seen)
        assert int(pid) == self.writer, (pid, self.writer)
        self.writer = None
        return int(status), seen

    def close(self) -> None:
        """Ends upsert_child, which kills any running writer first (and a writer dies with it)."""
        try:
            self.send("quit")
            self.proc.stdin.close()  # type: ignore[union-attr]
        except OSError:  # it has ended already
            pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for t in self.threads:
            t.join(timeout=5)


def phase(seen: list[str]) -> tuple[str, int]:
    """Where a writer was when killed, from what it printed, and how many documents it had
    committed to SQLite."""
    stored = max((int(line.split()[1]) for line in seen if line.startswith("stored ")), default=0)
    if "done" in seen:
        return "done", stored
    if stored == DOCS:
        return "committing", stored
    return ("storing" if stored else "starting"), stored


def inspect(home: Path, encoder, rnd: int, stored: int, full: bool) -> tuple[dict, int, list[str]]:
    """Open the collection as a server does and recover it; returns the recovery report, how many
    stored documents are not fully searchable, and what else is wrong. Every document's passages
    are checked against the id sets of the vector index and BM25, in memory and as saved (`full`:
    with the saved indexes loaded whole, else from their id maps); a sample of this round's
    passages is looked up by exact and by hybrid search."""
    c = Collection.open(home, NAME)
    try:
        report = recover(c, encoder)
        problems: list[str] = []
        folder = c.folder
        dense = set(c.index.row_ids[c.index.row_ids >= 0].tolist())
        lexical = set(c.bm25.ids.tolist())
        if full:
            saved = VectorIndex.load(folder / "vectors")
            saved_dense = set(saved.row_ids[saved.row_ids >= 0].tolist())
            saved_lexical = set(BM25Index.load(folder / "bm25").ids.tolist())
        else:
            saved_dense = set(VectorIndex.saved_ids(folder / "vectors").tolist())
            saved_bm25 = BM25Index.saved_ids(folder / "bm25")  # None: unreadable
            saved_lexical = set() if saved_bm25 is None else set(saved_bm25.tolist())
        passages_of: dict[str, list[int]] = defaultdict(list)
        for doc_id, pid in c.store.db.execute(
            "SELECT d.id, p.id FROM documents d LEFT JOIN passages p ON p.doc_id = d.id"
        ):
            passages_of[doc_id] += [] if pid is None else [pid]
        in_between = sum(
            not pids
            or not all(p in dense and p in saved_dense and p in lexical and p in saved_lexical for p in pids)
            for pids in passages_of.values()
        )
        stored_ids = set(c.store.passage_ids())
        for what, ids in (("vectors", dense), ("saved vectors", saved_dense)):
            if ids != stored_ids:
                problems.append(f"{len(ids ^ stored_ids)} {what} differ from the store")
        for what, ids in (("BM25", lexical), ("saved BM25", saved_lexical)):
            if ids != stored_ids:
                problems.append(f"{len(ids ^ stored_ids)} {what} ids differ from the store")
        # every document the writer committed is there, in this round's version
        titles = {
            doc_id: (c.store.get_document(doc_id) or {}).get("title") for doc_id, _, _ in round_documents(rnd)
        }
        for n, (doc_id, title, _) in enumerate(round_documents(rnd)):
            old = f"Record {doc_id[1:]} round {rnd - 1}"
            if titles[doc_id] not in ((title,) if n < stored else (title, old, None)):
                problems.append(f"{doc_id} holds {titles[doc_id]!r} after {stored} were stored")
        # a sample of this round's passages: an exact search of each one's own embedding finds it,
        # and so does a hybrid search of its text
        round_ids = sorted(p for d in titles for p in passages_of.get(d, []))
        pick = random.Random(rnd)
        rows = c.store.passages(sorted(pick.sample(round_ids, min(EXACT_SAMPLE, len(round_ids)))))
        if rows:
            vecs = encoder.encode([embed_text(r.doc_title, r.text, r.kind) for r in rows], kind="passage")
            scores, ids = c.index.search(vecs, 1)
            lost = [
                r.id for r, i, s in zip(rows, ids[:, 0], scores[:, 0], strict=True) if i != r.id or s < 0.999
            ]
            if lost:
                problems.append(f"exact search misses {len(lost)} of {len(rows)} passages, e.g. {lost[:3]}")
            for r in pick.sample(rows, min(HYBRID_SAMPLE, len(rows))):
                hits = c.search(r.text, encoder, k=10, hybrid=True)
                if r.id not in [h.passage_id for h in hits]:
                    problems.append(f"hybrid search misses passage {r.id}")
        return report, in_between, problems
    finally:
        c.close()


@pytest.mark.slow
def test_sigkilled_upsert_leaves_every_document_searchable_or_absent(request, tmp_path, tiny_model_dir):
    home = tmp_path / "home"
    t_start = time.perf_counter()
    writers = Writers(tiny_model_dir, home)  # it starts up while this process loads its encoder
    try:
        tiny_encoder = request.getfixturevalue("tiny_encoder")
        config = CollectionConfig(encoder=tiny_encoder.name, max_tokens=64, overlap_tokens=8)
        Collection.create(home, NAME, config).close()  # before the first writer opens it
        writers.expect("ready", READY_S)
        startup = time.perf_counter() - t_start
        # a whole round first: how long one takes, and the collection the kills start from
        t0 = writers.start(0)
        t_done, _ = writers.expect("done", DONE_S)
        duration = t_done - t0
        status, seen = writers.kill()
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (status, writers.stderr())
        report, in_between, problems = inspect(home, tiny_encoder, 0, DOCS, full=True)
        assert (in_between, problems) == (0, [])
        assert not any(report.values()), report  # a job that ran to its end leaves nothing to recover

        delays = random.Random(20240611)
        outcomes = []
        for kill in range(1, KILLS + 1):
            # stratified: kill i lands in the i-th twentieth of SPREAD rounds, at a random point
            delay = duration * SPREAD * (kill - 1 + delays.random()) / KILLS
            t0 = writers.start(kill)
            time.sleep(max(0.0, t0 + delay - time.perf_counter()))
            status, seen = writers.kill()
            lines = [line for _, line in seen]
            assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (
                f"writer of round {kill} ended with status {status} before it was killed, after {lines}"
                f"\nstderr:\n{writers.stderr()}"
            )
            where, stored = phase(lines)
            if where == "done":  # keep the length of a round current: the collection grows
                duration = next(t for t, line in seen if line == "done") - t0
            full = kill % FULL_LOAD_EVERY == 0 or kill == KILLS
            report, in_between, problems = inspect(home, tiny_encoder, kill, stored, full)
            outcomes.append((kill, round(delay, 3), where, stored, report, in_between, problems))
    finally:
        writers.close()
    elapsed = time.perf_counter() - t_start
    summary = "\n".join(map(str, outcomes))
    broken = [o for o in outcomes if o[5] or o[6]]
    assert not broken, f"{len(broken)} of {KILLS} kills left documents in between:\n{summary}"
    mid = [o for o in outcomes if o[2] in ("storing", "committing")]
    assert len(mid) >= KILLS // 2, f"too few kills landed mid-upsert:\n{summary}"
    assert any(o[4]["vectors_added"] for o in outcomes), f"recover never had work:\n{summary}"
    print(f"start-up {startup:.1f} s, round {duration:.2f} s, all {elapsed:.1f} s\n{summary}")
