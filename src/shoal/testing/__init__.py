"""Helpers for testing and benchmarking Shoal against real local Valkey topologies."""
