"""Whole-slide counting: readers, tissue mask, tile plan, engine, outputs."""
