"""kvrag: retrieval and context-augmented generation over multilingual text and code, with reusable
passage KV caches.

One import package over the project's folders (setuptools `package-dir`): `kvrag.encoders`,
`kvrag.kernels`, `kvrag.index`, `kvrag.rag`, `kvrag.service`. This package itself is the bottom layer,
which every other imports and which imports none of them: the error types (`kvrag.errors`) and
crash-safe file writes (`kvrag.atomic`).
"""

__version__ = "0.1.0"
