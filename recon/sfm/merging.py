"""Split models that share views, merged into one: the aligned union of their views and tracks.

An incremental run that cannot grow its model any further starts another one, and the views both models can
register are registered in both: such models overlap (sacre_coeur's second model holds 2 of the first's views).
Where they share views, pycolmap aligns one to the other (`align_reconstructions_via_reprojections`: a similarity
estimated robustly from the reprojections of the shared views' 3D points) but has no call that merges the aligned
models (COLMAP's C++ `MergeReconstructions`, behind its `model_merger` command, is not in the Python bindings).
So the merge is written here, after COLMAP's: the smaller model is moved into the larger one's frame, its views
that the larger lacks are added with their poses, and each of its tracks joins the larger model's: observations of
keypoints that the larger model has no 3D point for are added, and larger-model points that the track connects
are merged into one (`Reconstruction.merge_points3D`); then, as the incremental mapper does after each global
adjustment, the merged model's tracks are completed and merged through the database's correspondences
(`IncrementalMapper.complete_and_merge_tracks`), which joins the tracks the two models saw in no common keypoint.
Models that share fewer than `MIN_SHARED_VIEWS` views, or whose alignment fails, stay apart (the weakly linked
ring of the tests splits into halves that share none; there the global mapper is the remedy, recon.sfm.auto).
The merged model then gets the stage's outlier filter and global bundle adjustment like any other
(recon.sfm.refinement). Cost: temple_ring_full's model cut into two of 30 and 22 views sharing 5, the second moved
by a similarity, merged back in 0.3 s (47 views, camera centres as before to 1e-13, 7927 of its 7989 points).
"""

from __future__ import annotations

import copy
import itertools
import logging
from dataclasses import dataclass
from pathlib import Path

import pycolmap

logger = logging.getLogger(__name__)

#: Views two models must share before one is aligned to the other (a similarity has 7 degrees of freedom; the
#: reprojections of two views' points determine it, a third makes the robust estimate meaningful).
MIN_SHARED_VIEWS = 3
#: Alignment thresholds, COLMAP's `model_merger` defaults except the reprojection error: recon's models have
#: sub-pixel errors, so 8 px (pycolmap's default) rather than the command's 64 px.
MIN_INLIER_OBSERVATIONS = 0.3
MAX_REPROJECTION_ERROR = 8.0


@dataclass
class Merge:
    source_views: int
    shared_views: int
    added_views: int
    points_after: int

    def to_dict(self) -> dict:
        return {"source_views": self.source_views, "shared_views": self.shared_views,
                "added_views": self.added_views, "points_after": self.points_after}


def merge_overlapping(models: list[pycolmap.Reconstruction], database: Path | None = None,
                      triangulation: pycolmap.IncrementalTriangulatorOptions | None = None,
                      ) -> tuple[list[pycolmap.Reconstruction], list[Merge]]:
    """Merge every model that shares views with a larger one into it, largest first, until no pair merges.
    Returns the models (largest first) and the merges done; models are modified in place. With the `database`
    the models were mapped from, each merged model's tracks are then completed and merged through its
    correspondences (`complete_tracks`)."""
    by_size = lambda m: m.num_reg_images()  # noqa: E731
    models = sorted(models, key=by_size, reverse=True)
    merges: list[Merge] = []
    targets: list[pycolmap.Reconstruction] = []
    pending = True
    while pending:
        pending = False
        for target, source in itertools.combinations(models, 2):  # the larger model first
            merge = merge_into(target, source)
            if merge is None:
                continue
            merges.append(merge)
            targets += [] if any(target is done for done in targets) else [target]
            models = sorted((m for m in models if m is not source), key=by_size, reverse=True)
            pending = True
            break
    if database is not None:
        for target in targets:
            complete_tracks(target, database, triangulation)
    return models, merges


def complete_tracks(model: pycolmap.Reconstruction, database: Path,
                    triangulation: pycolmap.IncrementalTriangulatorOptions | None = None) -> None:
    """Complete and merge `model`'s tracks through the database's correspondences, as the incremental mapper does
    after each global bundle adjustment: a track the two models saw in no common keypoint is still one 3D point
    seen by both, joined here (on the tests' scene: 679 points -> the scene's 600, every observation found)."""
    with pycolmap.Database.open(database) as db:
        cache = pycolmap.DatabaseCache.create(db, pycolmap.DatabaseCacheOptions())
    mapper = pycolmap.IncrementalMapper(cache)
    mapper.begin_reconstruction(model)
    mapper.complete_and_merge_tracks(triangulation or pycolmap.IncrementalTriangulatorOptions())
    mapper.end_reconstruction(False)


def merge_into(target: pycolmap.Reconstruction, source: pycolmap.Reconstruction) -> Merge | None:
    """Merge `source` into `target` if they share at least MIN_SHARED_VIEWS registered views and align; else None
    (and `target` unchanged). `source` is left as it was."""
    shared = set(target.reg_image_ids()) & set(source.reg_image_ids())
    if len(shared) < MIN_SHARED_VIEWS:
        return None
    target_from_source = pycolmap.align_reconstructions_via_reprojections(
        source, target, min_inlier_observations=MIN_INLIER_OBSERVATIONS, max_reproj_error=MAX_REPROJECTION_ERROR)
    if target_from_source is None:
        logger.info("Models of %d and %d views share %d views but do not align: kept apart",
                    target.num_reg_images(), source.num_reg_images(), len(shared))
        return None
    moved = pycolmap.Reconstruction(source)
    moved.transform(target_from_source)
    added = _add_views(target, moved)
    _add_tracks(target, moved)
    target.update_point_3d_errors()
    merge = Merge(source.num_reg_images(), len(shared), added, target.num_points3D())
    logger.info("Merged a model of %d views (%d shared) into the largest: %d views added, %d points now",
                merge.source_views, merge.shared_views, merge.added_views, merge.points_after)
    return merge


def _add_views(target: pycolmap.Reconstruction, source: pycolmap.Reconstruction) -> int:
    """Register in `target` the frames `source` has registered and `target` has not, with source's poses (a frame
    target holds unregistered keeps its images; a missing one is copied without 3D points)."""
    registered = set(target.reg_frame_ids())
    added = 0
    for frame_id in source.reg_frame_ids():
        if frame_id in registered:
            continue
        frame = source.frame(frame_id)
        if not target.exists_rig(frame.rig_id):
            target.add_rig(source.rig(frame.rig_id))
        if target.exists_frame(frame_id):
            target.frame(frame_id).rig_from_world = frame.rig_from_world
        else:
            images = [copy.copy(source.image(data_id.id)) for data_id in frame.image_ids]
            for image in images:
                if not target.exists_camera(image.camera_id):
                    target.add_camera(source.camera(image.camera_id))
                for index in image.get_observation_point2D_idxs():
                    image.reset_point3D_for_point2D(index)
            frame = copy.copy(frame)
            frame.reset_rig_ptr()  # the copies point into `source`; target links its own
            target.add_frame(frame)
            for image in images:
                image.reset_camera_ptr()
                image.reset_frame_ptr()
                target.add_image(image)
        target.register_frame(frame_id)
        added += 1
    return added


def _add_tracks(target: pycolmap.Reconstruction, source: pycolmap.Reconstruction) -> None:
    """Each source track into target: its keypoints without a target 3D point become observations (of a new point,
    or of the target points the track meets), and the target points it meets are merged into one."""
    for point in source.points3D.values():
        new_elements, met = [], []
        for element in point.track.elements:
            point2D = target.image(element.image_id).point2D(element.point2D_idx)  # not .points2D: a copy of all
            if point2D.has_point3D():
                if point2D.point3D_id not in met:
                    met.append(point2D.point3D_id)
            else:
                new_elements.append(pycolmap.TrackElement(element.image_id, element.point2D_idx))
        if not met:
            if len(new_elements) >= 2:
                track = pycolmap.Track()
                track.add_elements(new_elements)
                target.add_point3D(point.xyz, track, point.color)
            continue
        keep = met[0]
        for element in new_elements:
            target.add_observation(keep, element)
        for other in met[1:]:
            keep = target.merge_points3D(keep, other)
