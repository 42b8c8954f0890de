"""Kept for existing imports: the helpers live in `sparse_mim.testing` (import them from there)."""
from sparse_mim.testing import assert_equivalent, patch_mask, rel_err, run_both  # noqa: F401
