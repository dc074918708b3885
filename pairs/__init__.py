"""Which image pairs to match: exhaustive, sequential (+loop closure) and retrieval, and their global descriptors."""
