"""Building a model folder safely: in a temporary folder that replaces the target only when complete,
under a lock per model, with a marker that records what it was built from. Shared by every bundled
model's builder (encoders, the generator, the compressor, merged adapters)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def staged_folder(dest: Path) -> Iterator[Path]:
    """A temporary folder beside `dest` to build a model in; it replaces `dest` only when the block ends
    without error, so an interrupted build never leaves a half-written model behind."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    tmp.chmod(0o755)
    try:
        yield tmp
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def marker_matches(marker: Path, key: str, digest: str) -> bool:
    """Whether a build marker (a JSON object) records `digest` under `key`; unreadable means no."""
    try:
        return json.loads(Path(marker).read_text(encoding="utf-8")).get(key) == digest
    except (OSError, ValueError, AttributeError):
        return False


@contextlib.contextmanager
def model_lock(models_dir: Path, name: str) -> Iterator[None]:
    """Serialise preparation of one model across processes (two `kvrag` commands at once)."""
    models_dir.mkdir(parents=True, exist_ok=True)
    with open(models_dir / f".{name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
