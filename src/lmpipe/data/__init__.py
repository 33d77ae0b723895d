"""Corpus sources, cleaning filters, deduplication and the clean stage's pipeline."""
