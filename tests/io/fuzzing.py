"""What the fuzz tests share: the number of inputs, hypothesis' settings and the bound on
allocations (tests/io/test_fuzz_validate.py, tests/io/test_fuzz_gguf.py; docs/fuzzing.md)."""

from __future__ import annotations

import os
import tracemalloc

from hypothesis import HealthCheck, settings

#: Inputs per test; ``LORATOOL_FUZZ_EXAMPLES`` raises it for a long run.
EXAMPLES = int(os.environ.get("LORATOOL_FUZZ_EXAMPLES", "60"))
#: The most one call may allocate on a mutated file (no length read from it is trusted).
PEAK_BYTES = 64 << 20

FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=5000,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=os.environ.get("LORATOOL_FUZZ_RANDOM") is None,
)


def bounded(fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, failing the test if it allocated ``PEAK_BYTES`` or more."""
    tracemalloc.start()
    try:
        return fn(*args, **kwargs)
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < PEAK_BYTES, f"peak allocation {peak} bytes"
