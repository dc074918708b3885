"""DeDoDe's dual-softmax matcher: mutual maxima of softmax(S, rows) * softmax(S, cols) above a threshold.

Same rule as the official `DualSoftMaxMatcher` (Parskatt/DeDoDe `DeDoDe/matchers/dual_softmax_matcher.py` and
`dual_softmax_matcher` in `DeDoDe/utils.py`): descriptors L2-normalised (`normalize=True`), S = inverse_temperature *
D0 D1^T, P = softmax over image-0 keypoints * softmax over image-1 keypoints, a pair (i, j) is a match when P[i, j]
is the maximum of its row and of its column and exceeds `threshold`. Published setting (the official demo
`demo/demo_match.py`): inverse temperature 20, threshold 0.1. kornia has no sparse dual-softmax matcher (its
DeDoDe carries a "TODO: ... mnn matchers"), hence this module. The score stored is P[i, j].

Steerable descriptors (DeDoDe C4/SO2) replace S by its maximum over the steered descriptors of image 0, as the
official steerers `MaxSimilarityMatcher` does (see feature_backends.base.SteerableMatcher); with an upright
descriptor the matcher is unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import SteerableMatcher


def dual_softmax_match(
    descriptors0: torch.Tensor, descriptors1: torch.Tensor, inverse_temperature: float = 20.0,
    threshold: float = 0.1, normalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N0,D), (N1,D) → matches0 (N0,) with -1 for unmatched and their probabilities P (N0,)."""
    if normalize:
        descriptors0, descriptors1 = F.normalize(descriptors0, dim=-1), F.normalize(descriptors1, dim=-1)
    return dual_softmax_from_similarity(descriptors0 @ descriptors1.T, inverse_temperature, threshold)


def dual_softmax_from_similarity(
    similarity: torch.Tensor, inverse_temperature: float = 20.0, threshold: float = 0.1
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rule on a (N0,N1) similarity matrix (cosine, or its maximum over steered descriptors)."""
    similarity = inverse_temperature * similarity
    probs = similarity.softmax(dim=0) * similarity.softmax(dim=1)
    best, best_j = probs.max(dim=1)
    column_best = probs.max(dim=0).values
    valid = (best == column_best[best_j]) & (best > threshold)
    matches0 = torch.where(valid, best_j, -1)
    return matches0, torch.where(valid, best, best.new_zeros(()))


class DualSoftmax(SteerableMatcher):
    default_conf = {
        "inverse_temperature": 20.0,
        "threshold": 0.1,
        "normalize": True,
    }

    def _match(self, data):
        descriptors0, descriptors1 = data["descriptors0"][0].T.float(), data["descriptors1"][0].T.float()
        if self.steerer is None:
            matches0, scores = dual_softmax_match(
                descriptors0, descriptors1, inverse_temperature=self.conf.inverse_temperature,
                threshold=self.conf.threshold, normalize=self.conf.normalize,
            )
        else:
            if self.conf.normalize:
                descriptors0, descriptors1 = F.normalize(descriptors0, dim=-1), F.normalize(descriptors1, dim=-1)
            similarity = self.steered_similarity(descriptors0, descriptors1, normalize=self.conf.normalize)
            matches0, scores = dual_softmax_from_similarity(similarity, self.conf.inverse_temperature,
                                                            self.conf.threshold)
        return {"matches0": matches0[None], "matching_scores0": scores[None]}
