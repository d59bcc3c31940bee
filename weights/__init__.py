"""Fetch, verify and convert the U²-Net weights (``python -m weights --help``)."""
