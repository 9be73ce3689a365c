"""Crash safety of an upsert: kill -9 a writer upserting 150 documents at 20 random moments; after
`recover`, every stored document is fully searchable (all its passages live in the vector index and
in BM25, in memory and as saved) or absent, never in between (tiny random encoder)."""

from __future__ import annotations

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

from index.collection import Collection, CollectionConfig
from index.hybrid import BM25Index
from index.job import embed_text, recover
from index.vector import VectorIndex

sys.path.insert(0, str(Path(__file__).parent))
from upsert_child import DOCS, round_documents  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
UPSERT_CHILD = Path(__file__).with_name("upsert_child.py")
NAME = "c"
KILLS = 20
SPREAD = 1.2  # kill moments spread over 1.2 times a whole round, so a few land after it is done
HYBRID_SAMPLE = 8  # passages of each round looked up by hybrid search


class Writers:
    """The upsert_child process: forks one writer per round; its output lines, timestamped."""

    def __init__(self, model_dir: Path, home: Path):
        self.proc = subprocess.Popen(
            [sys.executable, str(UPSERT_CHILD), str(model_dir), str(home), NAME],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[tuple[float, str]] = queue.Queue()
        self.log = []
        threading.Thread(target=self._read, daemon=True).start()
        self.writer: int | None = None

    def _read(self) -> None:
        for line in self.proc.stdout:  # type: ignore[union-attr]
            self.log.append((time.perf_counter(), line))
            self.lines.put((time.perf_counter(), line.strip()))
        self.lines.put((time.perf_counter(), "eof"))

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
                pp = self.proc.pid
                os.system(f"ps -o pid,ppid,stat,wchan:30,etime,cmd --ppid {pp} -p {pp} >&2; cat /proc/{pp}/status | grep -E 'State|Threads' >&2; ls -l /proc/{pp}/task >&2")
                os.system(f"gdb -p {pp} -batch -ex 'thread apply all bt' 2>&1 | grep -E '^#|Thread' | head -80 >&2")
                import fcntl; fcntl.fcntl(self.proc.stderr, fcntl.F_SETFL, os.O_NONBLOCK)
                try: data = self.proc.stderr.read()
                except Exception as e: data = repr(e)
                print("STDERR", len(data or ""), (data or "")[-3000:], file=sys.stderr)
                print("WRITER", self.writer, time.perf_counter(), file=sys.stderr)
                for t, l in self.log[-40:]: print("LOG", t, repr(l), file=sys.stderr)
                os.system(f"ps -o pid,ppid,stat,wchan:30,etime,cmd -p {self.writer} >&2; cat /proc/{self.writer}/stack >&2; grep State /proc/{self.writer}/status >&2")
                raise AssertionError(f"no {word!r} from upsert_child within {timeout} s") from None
            if line == "eof":
                raise AssertionError(f"upsert_child ended: {self.proc.stderr.read()}")  # type: ignore[union-attr]
            if line.split()[0] == word:
                return t, line.split()[1:]
            if seen is not None:
                seen.append((t, line))

    def start(self, rnd: int) -> float:
        self.proc.stdin.write(f"upsert {rnd}\n")  # type: ignore[union-attr]
        self.proc.stdin.flush()  # type: ignore[union-attr]
        t, (pid,) = self.expect("started", 30)
        self.writer = int(pid)
        return t

    def kill(self) -> tuple[int, list[tuple[float, str]]]:
        """SIGKILL the running writer; returns its wait status and what it printed, timestamped."""
        os.kill(self.writer, signal.SIGKILL)  # type: ignore[arg-type]
        seen: list[tuple[float, str]] = []
        _, (pid, status) = self.expect("exited", 30, seen)
        assert int(pid) == self.writer
        self.writer = None
        return int(status), seen

    def close(self) -> None:
        if self.writer is not None:
            os.kill(self.writer, signal.SIGKILL)
        self.proc.stdin.close()  # type: ignore[union-attr]
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def phase(seen: list[str]) -> tuple[str, int]:
    """Where a writer was when killed, from what it printed, and how many documents it had
    committed to SQLite."""
    stored = max((int(line.split()[1]) for line in seen if line.startswith("stored")), default=0)
    if "done" in seen:
        return "done", stored
    if stored == DOCS:
        return "committing", stored
    return ("storing" if stored else "starting"), stored


def inspect(home: Path, encoder, rnd: int, stored: int) -> tuple[dict, int, list[str]]:
    """Open the collection as a server does and recover it; returns the recovery report, how many
    stored documents are not fully searchable, and what else is wrong."""
    c = Collection.open(home, NAME)
    try:
        report = recover(c, encoder)
        problems: list[str] = []
        folder = c.folder
        dense = set(c.index.row_ids[c.index.row_ids >= 0].tolist())
        saved_dense = VectorIndex.load(folder / "vectors")
        saved_dense = set(saved_dense.row_ids[saved_dense.row_ids >= 0].tolist())
        lexical = set(c.bm25.ids.tolist())
        saved_lexical = set(BM25Index.load(folder / "bm25").ids.tolist())
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
        if dense != stored_ids or saved_dense != stored_ids:
            problems.append(f"{len(dense ^ stored_ids)} vectors differ from the store")
        # every document the writer committed is there, in this round's version
        titles = {
            doc_id: (c.store.get_document(doc_id) or {}).get("title") for doc_id, _, _ in round_documents(rnd)
        }
        for n, (doc_id, title, _) in enumerate(round_documents(rnd)):
            old = f"Record {doc_id[1:]} round {rnd - 1}"
            if titles[doc_id] not in ((title,) if n < stored else (title, old, None)):
                problems.append(f"{doc_id} holds {titles[doc_id]!r} after {stored} were stored")
        # this round's passages: an exact search of each one's own embedding finds it
        rows = c.store.passages(sorted(p for d in titles for p in passages_of.get(d, [])))
        if rows:
            vecs = encoder.encode([embed_text(r.doc_title, r.text, r.kind) for r in rows], kind="passage")
            scores, ids = c.index.search(vecs, 1)
            lost = [
                r.id for r, i, s in zip(rows, ids[:, 0], scores[:, 0], strict=True) if i != r.id or s < 0.999
            ]
            if lost:
                problems.append(f"exact search misses {len(lost)} of {len(rows)} passages, e.g. {lost[:3]}")
            for r in random.Random(rnd).sample(rows, min(HYBRID_SAMPLE, len(rows))):
                hits = c.search(r.text, encoder, k=10, hybrid=True)
                if r.id not in [h.passage_id for h in hits]:
                    problems.append(f"hybrid search misses passage {r.id}")
        return report, in_between, problems
    finally:
        c.close()


@pytest.mark.slow
def test_sigkilled_upsert_leaves_every_document_searchable_or_absent(tmp_path, tiny_model_dir, tiny_encoder):
    home = tmp_path / "home"
    config = CollectionConfig(encoder=tiny_encoder.name, max_tokens=64, overlap_tokens=8)
    Collection.create(home, NAME, config).close()
    t_start = time.perf_counter()
    writers = Writers(tiny_model_dir, home)
    try:
        writers.expect("ready", 180)
        startup = time.perf_counter() - t_start
        # a whole round first: how long one takes, and the collection the kills start from
        t0 = writers.start(0)
        t_done, _ = writers.expect("done", 120)
        duration = t_done - t0
        writers.kill()
        report, in_between, problems = inspect(home, tiny_encoder, 0, DOCS)
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
            assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (status, seen)
            where, stored = phase([line for _, line in seen])
            if where == "done":  # keep the length of a round current: the collection grows
                duration = next(t for t, line in seen if line == "done") - t0
            report, in_between, problems = inspect(home, tiny_encoder, kill, stored)
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
