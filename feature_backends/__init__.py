"""Local features, sparse and dense matchers, global descriptors, and the hloc-format store they write to."""
