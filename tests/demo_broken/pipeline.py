"""The real checks (the demo imports <app>.pipeline)."""

from shoal.examples.pipeline import expected_summary

__all__ = ["expected_summary"]
