"""Corpora, degradation and datasets."""
