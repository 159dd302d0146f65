"""Values that are not what a field expects, shared by the configuration tests of sensitivity and planner."""

from __future__ import annotations

import math

from hypothesis import strategies as st

# What JSON can hold where an int is expected, none of it an int in range.
NOT_INTS = [True, False, 1.5, 256.0, 1e9, math.inf, math.nan, "8", None, [8], {"n": 8}, 2**70, -(2**70), 10**400]

_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.sampled_from([2**63, 2**64, -(2**63), 10**400])
    | st.floats()
    | st.text(max_size=12)
)
# Any JSON value (and ints and floats JSON cannot hold exactly), for fields that must take anything.
JSON_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=8,
)
