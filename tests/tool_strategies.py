"""Hypothesis strategies for tool calls, shared by the tool-format tests.

Names the call syntax can write bare, text with quotes and unicode (no `<`,
so no control token by chance), and JSON values nested a few levels deep.
"""

from hypothesis import strategies as st

NAMES = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,11}", fullmatch=True)
TEXT = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="<"), max_size=12
) | st.sampled_from(
    ['a "quoted" word', "it's", "ünïcødé ✓", "x<y", "{a:b}", "[1,2]", "", "  pad  "]
)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(10**12), 10**12)
    | st.floats(allow_nan=False, allow_infinity=False, width=64)
    | TEXT
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(NAMES, inner, max_size=3)
    ),
    max_leaves=8,
)
