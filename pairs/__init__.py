"""Which image pairs to match: planning only.

planner.py combines the sources (exhaustive.py, sequential.py, retrieval.py, spatial.py) and counts what each adds;
io.py reads and writes hloc's pairs.txt. The global-descriptor backends retrieval runs (vlad, netvlad, cosplace)
are feature backends like any other: feature_backends/, registry kind "global".
"""
