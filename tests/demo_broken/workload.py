"""The real workload (the demo imports <app>.workload)."""

from shoal.examples.workload import chat_script, documents

__all__ = ["chat_script", "documents"]
