"""Benchmarks: figures, never assertions (see bench/README.md)."""

from pathlib import Path

__all__ = ["REFERENCE"]

# The authors' 18 test photos and their maps, kept in the repository (see its README).
REFERENCE = Path(__file__).resolve().parents[1] / "tests" / "data" / "reference"
