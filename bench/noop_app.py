"""The agents the benchmarks run: a no-op capability, so what is measured is Shoal,
and a 'nap' for the failover benchmark (tasks that take a known time). They live in
shoal.benchmark, which `shoal bench` uses too; this module keeps ``--app
bench.noop_app`` working."""

from shoal.benchmark import Noop

agents = [Noop]
