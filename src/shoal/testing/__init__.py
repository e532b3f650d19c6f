"""Helpers for testing and benchmarking Shoal against real local Valkey topologies
and against replicas of a fake external service (``replica``)."""
