"""Shared pieces of the fuzz tests: the example budget, and what counts as "one clear error".

CI runs a small number of examples per fuzzer; set ``PEFTKIT_FUZZ_EXAMPLES=2000`` for a long local run.
"""

from __future__ import annotations

import os
import resource

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from peftkit.errors import PeftError
from peftkit.train.errors import PeftkitError

EXAMPLES = int(os.environ.get("PEFTKIT_FUZZ_EXAMPLES", "40"))

# deadline=None: a shared 2-core machine makes per-example timings meaningless; the suite's time is bounded by
# the example count instead. Function-scoped fixtures (tmp_path) are fine: each example writes its own folder.
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=os.environ.get("PEFTKIT_FUZZ_RANDOM") is None,  # CI is reproducible; set it to explore
)

# The error types a user may see from peftkit for bad input (their messages must name the file and the fault).
CLEAR_ERRORS = (ValueError, OSError, PeftError, PeftkitError)

# JSON values of every kind, including the awkward ones: huge and negative numbers, NaN/inf, deep nesting.
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)


def assert_clear(err: BaseException, *names: str) -> None:
    """`err` is a user-facing error type whose one message names every string in `names` (a file, a key)."""
    assert isinstance(err, CLEAR_ERRORS), f"unclear error type {type(err).__name__}: {err}"
    message = str(err)
    assert message.strip(), f"{type(err).__name__} with an empty message"
    for name in names:
        assert name in message, f"{type(err).__name__} does not name {name!r}: {message}"


def max_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB (Linux reports KB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
