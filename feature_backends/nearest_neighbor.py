"""Mutual nearest neighbour matching with Lowe's ratio test, batched in torch (CPU or CUDA).

The whole similarity matrix is computed as one matrix product, split into row chunks only when it would
exceed `max_block_elements`; no Python loop runs over keypoints. Descriptors are assumed L2-normalised
(RootSIFT, DeDoDe, DISK ... are), so the Euclidean distance is sqrt(2 - 2 * similarity).

Speed: the matrix product and the top-k searches over it are the whole cost. With the mutual test, the column
search runs only for the columns that are the nearest neighbour of a row passing its own tests, the only ones
that can be in a match (same result; on temple_ring_full 9 % of the columns on average; 192 of its pairs, kernels
warm: 9.2-10.6 -> 6.1 ms per pair). On CPU the operands are padded to shape buckets (`_operand`), and the top-k
runs through the maxima of groups of 32 columns (`_row_top`: exact, 3.7 instead of 6.3 ms on a 2.4k x 2.4k
product). For large products, where reduced precision is faster, they run in it: float16 on CUDA; on an x86 CPU
with int8 dot-product units (VNNI: most Xeons since 2019, every CPU with AMX) int8, with each descriptor set
scaled so its largest magnitude is 127 (a 2.4k x 2.4k x 128 product: 4.1 ms against 10.2 ms in float32 on this
VM); other CPUs are probed for bfloat16/float16. The best three candidates of every row and column are then
rescored exactly in float32, so the ratio and distance tests see exact values; only the ranking of near-ties
(which the ratio test rejects anyway) can differ: in int8, all 1081 temple_ring_full pairs gave the float32
matches exactly (113,079 matches, 0 entries differ); in bfloat16, 99.998 % of fountain_p11's matches0 entries.
Per pair on 100 temple_ring_full pairs (same process, alternating, loaded VM): 12.3-18.4 ms before, 10.4-11.9 ms
with both (float32 with the grouped top-k alone: 12.0 ms).
Measured on an AMX CPU (8192x8000 descriptors, idle): product float32 156 ms, bfloat16 77 ms,
float16 70 ms; top-k over the result 73 / 66 / 86 ms.

Steerable descriptors (DeDoDe C4/SO2, chosen from features.h5) are matched on the maximum similarity over the
steered descriptors of image 0 (feature_backends.base.SteerableMatcher), which is one full matrix; the ratio and
mutual tests are then the same.
"""

from __future__ import annotations

import functools
import platform
import time

import numpy as np
import torch

from .base import SteerableMatcher


def mutual_nearest_neighbors(
    descriptors0: torch.Tensor,
    descriptors1: torch.Tensor,
    ratio_threshold: float | None = 0.8,
    distance_threshold: float | None = None,
    mutual: bool = True,
    max_block_elements: int = 1 << 26,
    compute_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Match (N0,D) to (N1,D) descriptors; returns matches0 (N0,) with -1 and scores (N0,) in [0,1].

    With `mutual`, a match must be the nearest neighbour in both directions and pass the ratio test in both
    directions, as COLMAP's cross-check does. The second ratio test matters: on unrelated image pairs a one-sided
    test keeps a few dozen chance matches, enough to send geometric verification into its full 10,000 RANSAC
    trials per model (measured: 27 vs 9 matches on an unrelated temple pair, 1.5 s vs 0 s of verification).
    """
    n0, n1 = descriptors0.shape[0], descriptors1.shape[0]
    compute_dtype = compute_dtype or similarity_dtype(descriptors0.device, n0 * n1)
    work0, work1 = _operand(descriptors0, compute_dtype), _operand(descriptors1, compute_dtype)
    # Both directions as row searches on their own product: a top-k down the columns of one product walks
    # memory with a stride and costs more than a second matrix product (15.5 vs 4.5 + 3.3 ms at 1500x1450).
    reduced = compute_dtype != descriptors0.dtype
    best_sim, best_idx = _top_candidates(work0, work1, min(3 if reduced else 2, n1), max_block_elements, n0, n1)
    if reduced:
        best_sim, best_idx = _exact_top(descriptors0, descriptors1, best_idx)
    if not mutual:
        return _decide(best_sim, best_idx, None, None, ratio_threshold, distance_threshold)
    # Only a column that is the nearest neighbour of a row passing its own tests can end in a match, so only those
    # columns are searched. Same result as searching all of them; on temple_ring_full pairs that is 9 % of the
    # columns on average (median 2 %, at most 60 %: most pairs do not overlap and the ratio test rejects most rows).
    columns = best_idx[_passes(best_sim, ratio_threshold, distance_threshold), 0].unique()
    k = min(3 if reduced else 2, n0)
    col_sim = best_sim.new_zeros((n1, min(2, n0)))
    col_idx = best_idx.new_full((n1, min(2, n0)), -1)
    if len(columns):
        found_sim, found_idx = _top_candidates(_operand(work1[columns], compute_dtype), work0, k, max_block_elements,
                                               len(columns), n0)
        if reduced:
            found_sim, found_idx = _exact_top(descriptors1[columns], descriptors0, found_idx)
        col_sim[columns], col_idx[columns] = found_sim, found_idx
    return _decide(best_sim, best_idx, col_sim, col_idx, ratio_threshold, distance_threshold)


def one_to_many_nearest_neighbors(
    descriptors0: torch.Tensor,
    others: list[torch.Tensor],
    ratio_threshold: float | None = 0.8,
    distance_threshold: float | None = None,
    mutual: bool = True,
    compute_dtype: torch.dtype | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`mutual_nearest_neighbors(descriptors0, d)` for every d in `others`, as two matrix products in total.

    On a GPU, per-pair products are too small to fill the device and kernel launches dominate; stacking the other
    images makes one large product per direction. The others are padded to a common size (padding never wins: its
    similarity is -inf). Results equal the pairwise function exactly (same float32 arithmetic, tested).
    """
    n0 = descriptors0.shape[0]
    compute_dtype = compute_dtype or similarity_dtype(descriptors0.device, n0 * sum(len(d) for d in others))
    if compute_dtype == torch.int8:  # the batched path (CUDA) multiplies in floating point
        compute_dtype = torch.float32
    sizes = [len(d) for d in others]
    longest = max(sizes)
    padded = descriptors0.new_zeros((len(others), longest, descriptors0.shape[1]))
    for k, d in enumerate(others):
        padded[k, : len(d)] = d
    flat = padded.reshape(-1, descriptors0.shape[1])
    valid_target = torch.arange(longest, device=flat.device)[None] < torch.tensor(sizes, device=flat.device)[:, None]
    similarity = (descriptors0.to(compute_dtype) @ flat.to(compute_dtype).T).reshape(n0, len(others), longest)
    similarity.masked_fill_(~valid_target[None], -float("inf"))
    k_rows = min(2, longest)
    row_sim, row_idx = similarity.topk(k_rows, dim=2)  # (n0, J, k)
    del similarity
    col_sim = col_idx = None
    if mutual:
        stacked = torch.cat(others)
        col_sim, col_idx = _top_candidates(stacked.to(compute_dtype), descriptors0.to(compute_dtype), min(2, n0),
                                           1 << 26)
        if compute_dtype != descriptors0.dtype:
            col_sim, col_idx = _exact_top(stacked, descriptors0, col_idx)
    results = []
    offset = 0
    for k, size in enumerate(sizes):
        best_sim, best_idx = row_sim[:, k], row_idx[:, k]
        if size < 2 and k_rows == 2:  # a one-keypoint image has no second neighbour
            best_sim, best_idx = best_sim[:, :1], best_idx[:, :1]
        if compute_dtype != descriptors0.dtype:
            best_sim, best_idx = _exact_top(descriptors0, others[k], best_idx)
        pair_col = (col_sim[offset:offset + size], col_idx[offset:offset + size]) if mutual else (None, None)
        results.append(_decide(best_sim, best_idx, *pair_col, ratio_threshold, distance_threshold))
        offset += size
    return results


def mutual_nearest_neighbors_from_similarity(
    similarity: torch.Tensor,
    ratio_threshold: float | None = 0.8,
    distance_threshold: float | None = None,
    mutual: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same tests on a given (N0,N1) similarity matrix of unit descriptors (e.g. the maximum over steered
    descriptors, which no single product gives)."""
    n0, n1 = similarity.shape
    best_sim, best_idx = similarity.topk(min(2, n1), dim=1)
    col_sim = col_idx = None
    if mutual:
        col_sim, col_idx = similarity.T.topk(min(2, n0), dim=1)
    return _decide(best_sim, best_idx, col_sim, col_idx, ratio_threshold, distance_threshold)


def _decide(
    best_sim: torch.Tensor,
    best_idx: torch.Tensor,
    col_sim: torch.Tensor | None,
    col_idx: torch.Tensor | None,
    ratio_threshold: float | None,
    distance_threshold: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ratio, distance and mutual tests from the two best candidates of every row (and column, if mutual)."""
    n0 = best_sim.shape[0]
    nearest = best_idx[:, 0]
    valid = _passes(best_sim, ratio_threshold, distance_threshold)
    if col_idx is not None:
        valid &= col_idx[nearest, 0] == torch.arange(n0, device=best_sim.device)
        valid &= _passes(col_sim, ratio_threshold, None)[nearest]
    matches0 = torch.where(valid, nearest, -1)
    scores = torch.where(valid, (best_sim[:, 0].float() + 1) / 2, torch.zeros((), device=best_sim.device))
    return matches0, scores


def _passes(similarity: torch.Tensor, ratio_threshold: float | None, distance_threshold: float | None) -> torch.Tensor:
    """Ratio and distance tests of every row from its two best similarities (N,2) (or one, which has no ratio)."""
    squared = (2 - 2 * similarity.float().clamp(-1, 1)).clamp(min=0)  # squared distances: no square roots needed
    valid = torch.ones(len(similarity), dtype=torch.bool, device=similarity.device)
    if ratio_threshold is not None and similarity.shape[1] == 2:
        valid &= squared[:, 0] <= ratio_threshold ** 2 * squared[:, 1]
    if distance_threshold is not None:
        valid &= squared[:, 0] <= distance_threshold ** 2
    return valid


def _top_candidates(
    queries: torch.Tensor, targets: torch.Tensor, k: int, max_block_elements: int,
    num_queries: int | None = None, num_targets: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k most similar targets of every query (N,k), computed in row blocks of bounded size. Rows past
    `num_queries` / `num_targets` are padding (see `_operand`): never searched, never returned."""
    num_queries = len(queries) if num_queries is None else num_queries
    num_targets = len(targets) if num_targets is None else num_targets
    rows = max(1, max_block_elements // max(len(targets), 1))
    sims, indices = [], []
    for start in range(0, len(queries), rows):
        block = queries[start:start + rows]
        product = torch._int_mm(block, targets.T) if block.dtype == torch.int8 else block @ targets.T
        block_sim, block_idx = _row_top(product, k, num_targets)
        sims.append(block_sim)
        indices.append(block_idx)
    return torch.cat(sims)[:num_queries], torch.cat(indices)[:num_queries]


#: Width of the column groups of `_row_top`.
TOP_GROUP = 32


def _row_top(scores: torch.Tensor, k: int, num_columns: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`scores[:, :num_columns].topk(k, dim=1)`, found on CPU through the maxima of groups of TOP_GROUP columns.

    The k largest entries of a row lie in its k groups with the largest maxima (a group outside them has k groups
    above it whose maxima are k entries at least as large), so one pass of group maxima, a top-k over those and
    a top-k over the k * TOP_GROUP entries of the chosen groups give the same values as a top-k over the row (up
    to the order of exact ties). torch's CPU top-k is a general selection, the cost of every match stage before:
    on a 2.4k x 2.4k product with k = 3, 6.3 ms against 3.7 ms for the groups. Padding columns (`_operand`) are
    set to the lowest value first; `scores` is a fresh product and is overwritten."""
    width = scores.shape[1]
    if scores.device.type != "cpu" or width % TOP_GROUP or width < 4 * TOP_GROUP or num_columns < k:
        return scores[:, :num_columns].topk(k, dim=1)
    lowest = torch.finfo(scores.dtype).min if scores.dtype.is_floating_point else torch.iinfo(scores.dtype).min
    scores[:, num_columns:] = lowest
    groups = min(k, width // TOP_GROUP)
    best_groups = scores.view(len(scores), -1, TOP_GROUP).amax(dim=2).topk(groups, dim=1).indices
    columns = (best_groups[:, :, None] * TOP_GROUP + torch.arange(TOP_GROUP)).reshape(len(scores), -1)
    values, order = scores.gather(1, columns).topk(k, dim=1)
    return values, columns.gather(1, order)


#: On CPU, descriptor operands are zero-padded to a multiple of this many rows (see `_operand`).
SHAPE_BUCKET = 256


def _operand(descriptors: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`descriptors` in `dtype` (int8: scaled so the largest magnitude is 127, see `INT8_SCALE`); on CPU
    contiguous and zero-padded to a multiple of SHAPE_BUCKET rows. torch's CPU
    matmul (oneDNN) prepares a kernel for every new shape, and matching sees a new shape in nearly every pair.
    Measured on this machine, 128-dim descriptors against 1650: a first product of a new shape took 12.7 ms in
    bfloat16 and 9.0 ms in float32, a repeated one 2.2 and 4.8 ms, a product padded to 256-row buckets 1.8 ms;
    the match stage on temple_ring_full went from 13.8 to 9.9-11.5 s. The padded rows and columns are cut off
    before any search."""
    quantize = dtype == torch.int8 and descriptors.dtype != torch.int8
    if descriptors.device.type != "cpu":
        return _quantized(descriptors.float().clone()) if quantize else descriptors.to(dtype)
    padded = descriptors.new_zeros((-(-len(descriptors) // SHAPE_BUCKET) * SHAPE_BUCKET, *descriptors.shape[1:]),
                                   dtype=torch.float32 if quantize else dtype)
    padded[: len(descriptors)] = descriptors
    # Quantised in place on the contiguous copy: half the time of working on the (N,D) view of a (D,N) array.
    return _quantized(padded) if quantize else padded


def _quantized(descriptors: torch.Tensor) -> torch.Tensor:
    """int8 copy scaled so the largest magnitude maps to INT8_SCALE (`descriptors` is overwritten)."""
    low, high = torch.aminmax(descriptors)
    scale = INT8_SCALE / max(float(high), -float(low), 1e-12)
    return descriptors.mul_(scale).round_().to(torch.int8)


#: int8 operands map each descriptor set's largest magnitude to this; the products accumulate in int32.
INT8_SCALE = 127.0


def _exact_top(queries: torch.Tensor, targets: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact float32 similarities of each query to its candidate targets (N,k): the best two, in order."""
    exact = torch.einsum("nd,nkd->nk", queries.float(), targets.float()[index])
    exact, order = exact.sort(dim=1, descending=True)
    return exact[:, :2], index.gather(1, order)[:, :2]


#: Below this many similarities per product, reduced precision does not pay on CPU. Measured on this machine (AMX,
#: 2 threads, idle, whole mutual_nearest_neighbors call, float32 vs bfloat16 with rescoring, N x (N+50) products):
#: N=600 2.2 vs 2.0 ms, 1000 4.3 vs 4.3, 1500 8.3 vs 7.3, 2000 13.7 vs 9.4, 3000 45.8 vs 17.9.
REDUCED_PRECISION_MIN_ELEMENTS = 1 << 21


def similarity_dtype(device: torch.device, num_elements: int) -> torch.dtype:
    if device.type == "cpu" and num_elements < REDUCED_PRECISION_MIN_ELEMENTS:
        return torch.float32
    return fastest_similarity_dtype(device)


def _is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


def _has_int8_units() -> bool:
    """Whether torch can multiply int8 matrices on this CPU with int8 dot-product units (x86 VNNI, which every CPU
    with AMX or AVX512-BF16 also has). Measured on this VM's AVX-512 Xeon with VNNI (no AMX, no AVX512-BF16), a
    2.4k x 2.4k x 128 product: 4.1 ms in int8, 10.2 ms in float32."""
    return hasattr(torch, "_int_mm") and bool(getattr(torch.cpu, "_is_vnni_supported", lambda: False)())


def _has_reduced_precision_units() -> bool:
    """Whether an x86 CPU has bfloat16/float16 matrix units (AMX, AVX512-BF16); other CPUs are probed.

    Without them torch's CPU products in reduced precision are emulated and slower than float32 (measured on this
    VM's AVX-512 Xeon without either: 2.4k x 2.4k product 4.9 ms float32, 24 ms bfloat16), so the probe, which cost
    2.6-4.2 s per process here (the first reduced-precision products build their kernels), can only return float32.
    """
    if not _is_x86():
        return True
    cpu = torch.cpu
    checks = ("_is_amx_tile_supported", "_is_amx_fp16_supported", "_is_avx512_bf16_supported")
    return any(getattr(cpu, name, lambda: True)() for name in checks)


@functools.lru_cache(maxsize=None)
def fastest_similarity_dtype(device: torch.device) -> torch.dtype:
    """The precision of large similarity products: float16 on CUDA; on an x86 CPU int8 where it has int8 dot-product
    units (`_has_int8_units`), else float32; on other CPUs the fastest of float32 / bfloat16 / float16 for a
    product plus top-k search (probed once per process, ~1 s), keeping float32 unless another is at least 25 %
    faster. On x86 the choice is fixed by the CPU, not timed, so a rerun or a resumed run on the same machine
    computes the same matches whatever the load."""
    if device.type == "cuda":
        return torch.float16
    if device.type != "cpu":
        return torch.float32
    if _is_x86():
        return torch.int8 if _has_int8_units() else torch.float32
    if not _has_reduced_precision_units():
        return torch.float32
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(4096, 128, generator=generator), torch.randn(4096, 128, generator=generator)
    timings = {}
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x, y = a.to(dtype), b.to(dtype)
        try:
            (x @ y.T).topk(3, dim=1)
        except RuntimeError:  # no kernel for this precision on this CPU
            continue
        start = time.perf_counter()
        for _ in range(3):
            (x @ y.T).topk(3, dim=1)
        timings[dtype] = time.perf_counter() - start
    best = min(timings, key=timings.get)
    return best if timings[best] < 0.75 * timings[torch.float32] else torch.float32


class MutualNearestNeighbor(SteerableMatcher):
    default_conf = {
        "ratio_threshold": 0.8,  # Lowe's ratio on Euclidean distances; None disables
        "distance_threshold": None,  # maximum Euclidean distance; None disables
        "mutual": True,
    }

    def _match(self, data):
        descriptors0, descriptors1 = data["descriptors0"][0].T.float(), data["descriptors1"][0].T.float()
        if self.steerer is not None:
            matches0, scores = mutual_nearest_neighbors_from_similarity(
                self.steered_similarity(descriptors0, descriptors1), ratio_threshold=self.conf.ratio_threshold,
                distance_threshold=self.conf.distance_threshold, mutual=self.conf.mutual,
            )
            return {"matches0": matches0[None], "matching_scores0": scores[None]}
        matches0, scores = mutual_nearest_neighbors(
            descriptors0,
            descriptors1,
            ratio_threshold=self.conf.ratio_threshold,
            distance_threshold=self.conf.distance_threshold,
            mutual=self.conf.mutual,
        )
        return {"matches0": matches0[None], "matching_scores0": scores[None]}

    def match_many(self, features0, others):
        """On CUDA, all pairs of one image in one batch (see one_to_many_nearest_neighbors).

        On CPU pairs go one by one: measured on temple_ring_full features (1.5k keypoints, 11 partners), the padded
        batch was no faster with 2 threads (99.6 vs 103.7 ms/pair) and slower with 1 (65.4 vs 40.7): the stacked
        similarity matrix (~140 MB) leaves the cache, which the per-pair one (~9 MB) does not.
        """
        empty = len(features0["keypoints"]) == 0 or any(len(f["keypoints"]) == 0 for f in others)
        if self.device.type != "cuda" or empty or self.steerer is not None:
            return super().match_many(features0, others)
        to_tensor = lambda f: torch.from_numpy(np.ascontiguousarray(f["descriptors"].T)).float().to(self.device)  # noqa: E731
        with torch.inference_mode():
            results = one_to_many_nearest_neighbors(
                to_tensor(features0), [to_tensor(f) for f in others],
                ratio_threshold=self.conf.ratio_threshold,
                distance_threshold=self.conf.distance_threshold,
                mutual=self.conf.mutual,
            )
        return [{"matches0": m.cpu().numpy().astype(np.int32), "matching_scores0": s.cpu().numpy().astype(np.float32)}
                for m, s in results]
