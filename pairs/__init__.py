"""Which image pairs to match, and the global descriptors that retrieval needs.

planner.py combines the sources (exhaustive.py, sequential.py, retrieval.py, spatial.py) and counts what each adds;
io.py reads and writes hloc's pairs.txt; vlad.py (weight-free), netvlad.py and cosplace.py are the global-descriptor
backends, the learned ones sharing learned.py.
"""
