"""Helpers shared by the tests (not tests themselves)."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the checkout
