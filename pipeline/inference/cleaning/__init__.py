"""Cleaning a corpus with a trained restoration chain on Ray Data (pipeline/clean_corpus.py, docs/cleaning.md)."""
