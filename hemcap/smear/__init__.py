"""Smears: find the white cells, crop and caption them, and report per cell and per smear."""
