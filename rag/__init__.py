"""Retrieval-augmented generation: evaluation today; generation and KV caches build on it."""
