"""Measurement and pictures for QJL studio: memory, timing, agreement and quality metrics, figures, export, and the
command line (``python -m profiling``)."""
