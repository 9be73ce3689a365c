"""Evaluation harnesses (BEIR retrieval)."""
