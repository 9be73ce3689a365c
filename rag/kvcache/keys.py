"""Cache keys for passage and prefix KV blobs.

A passage's cache depends on the model, the codec, the prefix it was computed after and its own
token ids (and on kvrag's cache layout). All of them go into the key, so any change is a miss and
never a wrong cache.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass

LAYOUT_VERSION = 1
KEY_PREFIX = "kvrag:kv:"


@dataclass(frozen=True)
class PassageKVKey:
    """Identity of one cached piece. An empty `passage_ids` denotes the shared prefix itself."""

    model: str
    codec: str
    prefix_ids: tuple[int, ...]
    passage_ids: tuple[int, ...]
    layout: int = LAYOUT_VERSION

    @classmethod
    def of(
        cls, model: str, codec: str, prefix_ids: Sequence[int], passage_ids: Sequence[int]
    ) -> PassageKVKey:
        return cls(model, codec, tuple(int(i) for i in prefix_ids), tuple(int(i) for i in passage_ids))

    @property
    def digest(self) -> str:
        h = hashlib.sha256()
        kind = "passage" if self.passage_ids else "prefix"
        head = f"kvrag-kv|{kind}|layout={self.layout}|model={self.model}|codec={self.codec}|"
        h.update(head.encode())
        h.update(struct.pack("<II", len(self.prefix_ids), len(self.passage_ids)))
        h.update(struct.pack(f"<{len(self.prefix_ids)}q", *self.prefix_ids))
        h.update(struct.pack(f"<{len(self.passage_ids)}q", *self.passage_ids))
        return h.hexdigest()

    @property
    def key(self) -> str:
        kind = "p" if self.passage_ids else "x"
        return f"{KEY_PREFIX}{kind}:{self.digest}"
