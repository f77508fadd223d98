"""Test-session settings, read before anything imports jax."""

import os

# The tests compile hundreds of tiny programs: XLA's backend optimisations cost more time than
# they save there. Numerics are unchanged (no fast-math); benchmarks run outside pytest.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
