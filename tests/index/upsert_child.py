"""Crash-test helper: upsert 150 documents into a collection in forked writers, to be killed at random.

    python tests/index/upsert_child.py MODEL_DIR HOME [NAME]

Imports everything, builds the encoder from MODEL_DIR once and prints "ready"; then it reads
commands from stdin:

  "upsert ROUND"  forks a writer that opens collection NAME (default "c") in HOME and upserts the
                  150 documents of that round with `kvrag.index.job.index_documents` (see
                  `round_documents`), so a kill costs no start-up. The writer prints "started PID",
                  "stored N" once N documents of the round are committed to SQLite, "stored 150"
                  when the last one is, then "done" when the job has returned, and waits to be killed.
  "kill"          SIGKILLs the running writer (if it has not exited already).
  "quit"          (or the end of stdin) kills any running writer and ends.

Whenever a writer is gone, killed or not, this prints "exited PID STATUS" (STATUS as `os.waitpid`
gives it). The writer is this process's child, and only this process reaps it, so a kill never
reaches a recycled pid; a writer that fails before it is killed is reported at once, with its
traceback on stderr.

Every line on stdout is one whole `write` (under PIPE_BUF, so atomic on a pipe), never the pieces
`print` writes when Python runs unbuffered (PYTHONUNBUFFERED): a writer killed between the pieces
would leave half a line that the next message ("exited ...") is glued to. A writer sends its lines
on a copy of stdout and points its own stdout at stderr, so that nothing a library prints can break
a line either.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the project root, whatever the cwd

DOCS = 150
STRIDE = 75  # each round replaces the last 75 documents of the previous round and adds 75 new ones
BATCH_DOCS = 16  # passages per embedding batch: vectors are added in many batches per round
WORDS = ["harbour", "lantern", "barley", "river", "engine", "window", "market", "forest", "winter"]
POLL = 0.05  # seconds between checks that a running writer has not exited by itself


def round_documents(rnd: int) -> list[tuple[str, str, str]]:
    """(id, title, text) of the documents a round upserts: ids d{75*rnd}..d{75*rnd+149}, each of
    two to four paragraphs whose every sentence holds a word unique to (round, document, sentence),
    so that every passage has an exact embedding and BM25 terms no other passage shares."""
    docs = []
    for j in range(STRIDE * rnd, STRIDE * rnd + DOCS):
        paragraphs = []
        for p in range(2 + j % 3):
            sentences = [
                f"The {WORDS[(j + p + s) % len(WORDS)]} of record {j} keeps mark r{rnd}d{j}p{p}s{s} "
                f"close to the {WORDS[(3 * j + s) % len(WORDS)]} in round {rnd}."
                for s in range(3)
            ]
            paragraphs.append(" ".join(sentences))
        docs.append((f"d{j}", f"Record {j} round {rnd}", "\n\n".join(paragraphs)))
    return docs


def say(fd: int, *words: object) -> None:
    """One line on `fd` in a single write."""
    os.write(fd, (" ".join(map(str, words)) + "\n").encode())


def writer(home: Path, name: str, rnd: int, encoder, out: int) -> None:
    from kvrag.index.collection import Collection
    from kvrag.index.job import Document, index_documents

    def documents() -> Iterator[Document]:
        for n, (doc_id, title, text) in enumerate(round_documents(rnd)):
            say(out, "stored", n)  # asked for document n: the n before it are committed
            yield Document(doc_id, text, title=title)
        say(out, "stored", DOCS)

    say(out, "started", os.getpid())
    collection = Collection.open(home, name)
    index_documents(collection, documents(), encoder, batch_docs=BATCH_DOCS)
    say(out, "done")
    while True:
        time.sleep(60)


def die_with_parent(parent: int) -> None:
    """SIGKILL this process when `parent` ends (Linux), so that no writer outlives a killed test."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # it ended before the line above
        os._exit(1)


def fork_writer(home: Path, name: str, rnd: int, encoder) -> int:
    parent = os.getpid()
    pid = os.fork()
    if pid:
        return pid
    try:
        die_with_parent(parent)
        out = os.dup(1)
        os.dup2(2, 1)  # stray prints go to stderr
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)  # the commands are the parent's
        writer(home, name, rnd, encoder, out)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stderr.flush()
        os._exit(1)  # only reached when the writer failed: never run the parent's code


def serve(home: Path, name: str, encoder) -> None:
    pending = b""
    running: int | None = None

    def reap(pid: int, flags: int) -> bool:
        nonlocal running
        done, status = os.waitpid(pid, flags)
        if done:
            say(1, "exited", pid, status)
            running = None
        return bool(done)

    try:
        while True:
            if running is not None:
                reap(running, os.WNOHANG)
            if b"\n" not in pending:
                if select.select([0], [], [], None if running is None else POLL)[0]:
                    chunk = os.read(0, 4096)
                    if not chunk:
                        return
                    pending += chunk
                continue
            line, pending = pending.split(b"\n", 1)
            cmd = line.decode().split()
            if not cmd:
                continue
            if cmd[0] == "quit":
                return
            if cmd[0] == "kill":
                if running is not None:  # else it exited by itself, and that was reported
                    os.kill(running, signal.SIGKILL)  # not reaped yet: still this writer's pid
                    reap(running, 0)
            elif cmd[0] == "upsert" and len(cmd) == 2:
                if running is not None:
                    raise SystemExit(f"upsert_child: writer {running} is still running")
                running = fork_writer(home, name, int(cmd[1]), encoder)
            else:
                raise SystemExit(f"upsert_child: unknown command {line.decode().strip()!r}")
    finally:
        if running is not None:
            os.kill(running, signal.SIGKILL)
            reap(running, 0)


def main(argv: list[str]) -> None:
    # no thread pools in the parent: threads do not survive fork, and a lock one of them holds
    # at the fork stays locked in the writer
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"
    import faiss
    import torch
    import tqdm.std

    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    tqdm.std.tqdm.monitor_interval = 0  # no tqdm monitor thread

    import kvrag.index.job  # noqa: F401 - imported before forking, like everything a writer uses
    from kvrag.encoders.encoder import EncoderConfig, SentenceTransformerEncoder

    t0 = time.perf_counter()
    encoder = SentenceTransformerEncoder(EncoderConfig(model=argv[1], batch_tokens=512))
    encoder.encode(["warm up"], kind="passage")
    home, name = Path(argv[2]), argv[3] if len(argv) > 3 else "c"
    say(1, "ready", round(time.perf_counter() - t0, 3))
    serve(home, name, encoder)


if __name__ == "__main__":
    main(sys.argv)
