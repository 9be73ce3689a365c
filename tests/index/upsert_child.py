"""Crash-test helper: upsert 150 documents into a collection in forked writers, to be killed at random.

    python tests/index/upsert_child.py MODEL_DIR HOME [NAME]

Imports everything, builds the encoder from MODEL_DIR once and prints "ready"; then, for each line
"upsert ROUND" read from stdin, forks a writer that opens collection NAME (default "c") in HOME and
upserts the 150 documents of that round with `index.job.index_documents` (see `round_documents`),
so a kill costs no start-up. The writer prints "started PID", "stored N" once N documents of the
round are committed to SQLite, "stored 150" when the last one is, then "done" when the job has
returned, and waits to be killed. The parent prints "exited PID STATUS" when the writer is gone.
"quit" (or the end of stdin) ends it.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the project root, whatever the cwd
os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the tokenizer's thread pool does not survive fork

DOCS = 150
STRIDE = 75  # each round replaces the last 75 documents of the previous round and adds 75 new ones
BATCH_DOCS = 16  # passages per embedding batch: vectors are added in many batches per round
WORDS = ["harbour", "lantern", "barley", "river", "engine", "window", "market", "forest", "winter"]


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


def writer(home: Path, name: str, rnd: int, encoder) -> None:
    from index.collection import Collection
    from index.job import Document, index_documents

    def documents() -> Iterator[Document]:
        for n, (doc_id, title, text) in enumerate(round_documents(rnd)):
            print("stored", n, flush=True)  # asked for document n: the n before it are committed
            yield Document(doc_id, text, title=title)
        print("stored", DOCS, flush=True)

    print("started", os.getpid(), flush=True)
    collection = Collection.open(home, name)
    index_documents(collection, documents(), encoder, batch_docs=BATCH_DOCS)
    print("done", flush=True)
    while True:
        time.sleep(60)


def main(argv: list[str]) -> None:
    import faiss
    import torch

    torch.set_num_threads(1)  # no thread pools in the parent: they would not survive fork
    faiss.omp_set_num_threads(1)

    import index.job  # noqa: F401 - imported before forking, like everything a writer uses
    from encoders.encoder import EncoderConfig, SentenceTransformerEncoder

    t0 = time.perf_counter()
    encoder = SentenceTransformerEncoder(EncoderConfig(model=argv[1], batch_tokens=512))
    encoder.encode(["warm up"], kind="passage")
    home, name = Path(argv[2]), argv[3] if len(argv) > 3 else "c"
    print("ready", round(time.perf_counter() - t0, 3), flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "quit":
            break
        if cmd[0] != "upsert":
            raise SystemExit(f"upsert_child: unknown command {line.strip()!r}")
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            try:
                writer(home, name, int(cmd[1]), encoder)
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stderr.flush()
                os._exit(1)  # only reached when the writer failed: never run the parent's code
        dbg = open("/tmp/dbg/child.log", "a")
        print(time.time(), os.getpid(), "forked", pid, file=dbg, flush=True)
        _, status = os.waitpid(pid, 0)
        print(time.time(), os.getpid(), "reaped", pid, status, file=dbg, flush=True)
        print("exited", pid, status, flush=True)
        print(time.time(), os.getpid(), "printed", pid, status, file=dbg, flush=True)


if __name__ == "__main__":
    main(sys.argv)
