"""The `recon` command: a thin argparse layer over the stage functions.

Backend options not covered by a flag go through `--conf key=value` (repeatable, dotted keys for nested
values); values are parsed as JSON when possible (numbers, true/false/null, lists) and kept as strings otherwise,
never evaluated. Errors derived from ReconError print one clear message and exit with their code (2 for bad
input); SIGTERM is turned into KeyboardInterrupt so every open output file is published before exiting.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from feature_backends import registry
from feature_backends.errors import ReconError

logger = logging.getLogger("recon")


def parse_overrides(items: Sequence[str] | None) -> dict[str, Any]:
    conf: dict[str, Any] = {}
    for item in items or ():
        if "=" not in item:
            raise ReconError(f"--conf expects key=value, got '{item}'")
        key, raw = item.split("=", 1)
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        target = conf
        *parents, leaf = key.split(".")
        for parent in parents:
            target = target.setdefault(parent, {})
        target[leaf] = value
    return conf


def _feature_conf(args) -> dict[str, Any]:
    conf = parse_overrides(getattr(args, "conf", None))
    if getattr(args, "max_keypoints", None) is not None:
        conf["max_keypoints"] = args.max_keypoints
    if getattr(args, "resize_max", None) is not None:
        conf["resize_max"] = args.resize_max
    if getattr(args, "weights", None):
        conf["weights"] = args.weights
    return conf


def _add_pairs_options(parser: argparse.ArgumentParser, default_method: str) -> None:
    group = parser.add_argument_group("pairs")
    group.add_argument("--method", "--pairs", dest="method", default=default_method,
                       choices=["auto", "exhaustive", "sequential", "retrieval", "spatial"])
    group.add_argument("--num-matched", type=int, default=20,
                       help="retrieval: neighbours per query; sequential: loop-closure neighbours per loop frame")
    group.add_argument("--retrieval", default="vlad", help=f"global descriptor ({', '.join(registry.names('global'))})")
    group.add_argument("--retrieval-conf", action="append", metavar="KEY=VALUE",
                       help="global descriptor option, e.g. backbone=ResNet18, dim=512, weights=PATH")
    group.add_argument("--query-list", type=Path, help="retrieval: file of image names that query (default: all)")
    group.add_argument("--database-list", type=Path, help="retrieval: file of image names to retrieve from")
    group.add_argument("--min-similarity", type=float, help="retrieval: drop neighbours below this cosine similarity")
    group.add_argument("--max-pairs-per-image", type=int, help="retrieval: no image in more than this many pairs")
    group.add_argument("--overlap", type=int, default=10, help="sequential: frames matched ahead")
    group.add_argument("--quadratic-overlap", action=argparse.BooleanOptionalAction, default=True,
                       help="sequential: also frames i+2^k (COLMAP default)")
    group.add_argument("--loop-closure", action="store_true", help="sequential: add retrieval neighbours")
    group.add_argument("--loop-every", type=int, default=10, help="sequential: loop-closure frame interval")
    group.add_argument("--gps", dest="gps_prior", action="store_true",
                       help="retrieval/loop closure: only among EXIF-GPS neighbours (images without GPS stay in)")
    group.add_argument("--spatial-max-neighbors", type=int, default=50, help="spatial / --gps: nearest images kept")
    group.add_argument("--spatial-max-distance", type=float, default=100.0, help="spatial / --gps: radius in metres")
    group.add_argument("--exhaustive-max-images", type=int, default=50, help="auto: exhaustive up to this many images")


def _pairs_config(args) -> dict[str, Any]:
    """RunConfig fields from the pairs options."""
    from pairs.io import read_name_list

    return dict(
        pairs=args.method, exhaustive_max_images=args.exhaustive_max_images, num_matched=args.num_matched,
        overlap=args.overlap, quadratic_overlap=args.quadratic_overlap, loop_closure=args.loop_closure,
        loop_every=args.loop_every, retrieval=args.retrieval, retrieval_conf=parse_overrides(args.retrieval_conf),
        query_list=read_name_list(args.query_list) if args.query_list else None,
        database_list=read_name_list(args.database_list) if args.database_list else None,
        min_similarity=args.min_similarity, max_pairs_per_image=args.max_pairs_per_image, gps_prior=args.gps_prior,
        spatial_max_neighbors=args.spatial_max_neighbors, spatial_max_distance=args.spatial_max_distance,
    )


def _add_sfm_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--camera-mode", default="single", choices=["single", "per-folder", "per-image"])
    parser.add_argument("--camera-model", default="SIMPLE_RADIAL")
    parser.add_argument("--mapper", default="incremental", choices=["incremental", "global"])
    parser.add_argument("--mapper-option", action="append", metavar="KEY=VALUE",
                        help="pycolmap.IncrementalPipelineOptions field, e.g. mapper.init_min_num_inliers=50")
    parser.add_argument("--refine-principal-point", default="auto", choices=["auto", "always", "never"],
                        help="after mapping, free the principal point of shared cameras; 'auto' keeps it only where "
                             "the BA covariance shows the views determine it (default), 'never' is COLMAP's behaviour")


def _sfm_options(args):
    from .sfm import SfMOptions

    return SfMOptions(camera_mode=args.camera_mode, camera_model=args.camera_model, mapper=args.mapper,
                      mapper_options=parse_overrides(args.mapper_option), num_threads=-1,
                      refine_principal_point=args.refine_principal_point)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recon", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="photos → pairs → features → matches → SfM → exports")
    run.add_argument("images", type=Path)
    run.add_argument("out", type=Path)
    run.add_argument("--features", default="sift", help=f"local features ({', '.join(registry.names('features'))})")
    run.add_argument("--matcher", default="mnn",
                     help=f"sparse ({', '.join(registry.names('matcher'))}), dense ({', '.join(registry.names('dense'))}), "
                          "or anchored dense FEATURES+DENSE (e.g. sift+roma, dad+roma)")
    run.add_argument("--max-keypoints", type=int)
    run.add_argument("--resize-max", type=int)
    run.add_argument("--weights", help="explicit weight file for the feature backend")
    run.add_argument("--conf", action="append", metavar="KEY=VALUE", help="feature backend option")
    run.add_argument("--matcher-conf", action="append", metavar="KEY=VALUE", help="matcher option")
    run.add_argument("--ratio", type=float, help="mnn: Lowe ratio threshold")
    _add_pairs_options(run, "auto")
    _add_sfm_options(run)
    run.add_argument("--export", default="colmap-txt,ply,3dgs,nerfstudio", help="comma-separated export formats")
    run.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: CUDA when present)")
    run.add_argument("--splat", action="store_true", help="train Gaussian splats after SfM (recon splat)")
    run.add_argument("--splat-iterations", type=int, default=30000)
    run.add_argument("--splat-strategy", choices=["default", "mcmc"], default="default")

    pairs = commands.add_parser("pairs", help="write pairs.txt")
    pairs.add_argument("images", type=Path)
    pairs.add_argument("output", type=Path)
    _add_pairs_options(pairs, "exhaustive")
    pairs.add_argument("--device", default=None)

    ext = commands.add_parser("extract", help="write features.h5 (hloc layout)")
    ext.add_argument("images", type=Path)
    ext.add_argument("output", type=Path)
    ext.add_argument("--features", default="sift")
    ext.add_argument("--max-keypoints", type=int)
    ext.add_argument("--resize-max", type=int)
    ext.add_argument("--weights")
    ext.add_argument("--conf", action="append", metavar="KEY=VALUE")
    ext.add_argument("--as-half", action="store_true", help="store descriptors as float16 (keypoints stay float32)")
    ext.add_argument("--device", default=None)

    mat = commands.add_parser("match", help="write matches.h5 (hloc layout)")
    mat.add_argument("pairs", type=Path)
    mat.add_argument("features", type=Path)
    mat.add_argument("output", type=Path)
    mat.add_argument("--matcher", default="mnn")
    mat.add_argument("--ratio", type=float)
    mat.add_argument("--conf", action="append", metavar="KEY=VALUE")
    mat.add_argument("--device", default=None)

    sfm = commands.add_parser("sfm", help="COLMAP database, verification and mapping")
    sfm.add_argument("images", type=Path)
    sfm.add_argument("out", type=Path)
    sfm.add_argument("--pairs", type=Path)
    sfm.add_argument("--features", type=Path)
    sfm.add_argument("--matches", type=Path)
    _add_sfm_options(sfm)

    exp = commands.add_parser("export", help="export OUT/sparse/0")
    exp.add_argument("out", type=Path)
    exp.add_argument("--format", default="colmap-txt", help="colmap-txt, ply, nerfstudio, 3dgs (comma-separated)")
    exp.add_argument("--images", type=Path, help="image folder (default: the one recorded in OUT/run.json)")

    from .eval import build_parser as build_eval_parser

    build_eval_parser(commands.add_parser("eval", help="compare a model with ground-truth cameras (pose AUC)"))

    sp = commands.add_parser("splat", help="train Gaussian splats on OUT/undistorted (gsplat; CPU reference path without CUDA)")
    sp.add_argument("out", type=Path)
    sp.add_argument("--iterations", type=int, default=30000)
    sp.add_argument("--eval-every", type=int, default=8, help="hold out every k-th image (0: none)")
    sp.add_argument("--resolution-scale", type=int, choices=[1, 2, 4, 8], default=None,
                    help="default: 1 on CUDA, longer side <= 320 px on CPU")
    sp.add_argument("--strategy", choices=["default", "mcmc"], default="default")
    sp.add_argument("--resume", action="store_true", help="continue from the latest OUT/splats/checkpoints/step_*.pt")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--device", default=None)

    weights = commands.add_parser("weights", help="list or verify weight files")
    weights.add_argument("action", choices=["list", "check"])

    return parser


def _command_run(args) -> int:
    from .pipeline import RunConfig, run

    matcher_conf = parse_overrides(args.matcher_conf)
    if args.ratio is not None:
        matcher_conf["ratio_threshold"] = args.ratio
    config = RunConfig(
        features=args.features, feature_conf=_feature_conf(args), matcher=args.matcher, matcher_conf=matcher_conf,
        **_pairs_config(args), sfm=_sfm_options(args), exports=tuple(f for f in args.export.split(",") if f),
        device=args.device,
    )
    result = run(args.images, args.out, config)
    print(result.summary())
    if args.splat:
        from .splat import SplatConfig, splat

        if "3dgs" not in config.exports:
            raise ReconError("--splat trains on the undistorted export: keep '3dgs' in --export")
        path = splat(args.out, SplatConfig(iterations=args.splat_iterations, strategy=args.splat_strategy,
                                           device=args.device))
        print(f"splats → {path} (point_cloud.ply, metrics.json, renders/)")
    return 0


def _command_pairs(args) -> int:
    from feature_backends.images import list_images

    from .pipeline import RunConfig, plan_pairs

    names = list_images(args.images)
    config = RunConfig(**_pairs_config(args), device=args.device)
    path, method, count = plan_pairs(args.images, args.output.parent, names, config, pairs_path=args.output)
    print(f"{count} pairs ({method}) → {path} (per-source counts in {path.with_name(path.stem + '-stats.json')})")
    return 0


def _command_extract(args) -> int:
    from .stages import extract

    extract({"name": args.features, **_feature_conf(args)}, args.images, args.output, device=args.device,
            as_half=args.as_half)
    print(f"features → {args.output}")
    return 0


def _command_match(args) -> int:
    from .stages import match

    conf = parse_overrides(args.conf)
    if args.ratio is not None:
        conf["ratio_threshold"] = args.ratio
    match({"name": args.matcher, **conf}, args.pairs, args.features, args.output, device=args.device)
    print(f"matches → {args.output}")
    return 0


def _command_sfm(args) -> int:
    import shutil

    from .sfm import reconstruct

    pairs = args.pairs or args.out / "pairs.txt"
    features = args.features or args.out / "features.h5"
    matches = args.matches or args.out / "matches.h5"
    result = reconstruct(args.out / "sfm", args.images, pairs, features, matches, _sfm_options(args))
    shutil.rmtree(args.out / "sparse", ignore_errors=True)
    shutil.copytree(result.sparse_dir.parent, args.out / "sparse")
    print(f"{result.num_registered}/{result.num_images} registered, {result.num_points} points, "
          f"reprojection error {result.mean_reprojection_error:.3f} px → {args.out / 'sparse' / '0'}")
    return 0


def _command_export(args) -> int:
    from .export import export

    for fmt, path in export(args.out, [f for f in args.format.split(",") if f], args.images).items():
        print(f"{fmt} → {path}")
    return 0


def _command_eval(args) -> int:
    from .eval import run_from_args

    run_from_args(args)
    return 0


def _command_splat(args) -> int:
    from .splat import SplatConfig, splat

    path = splat(args.out, SplatConfig(iterations=args.iterations, eval_every=args.eval_every,
                                       resolution_scale=args.resolution_scale, strategy=args.strategy,
                                       resume=args.resume, seed=args.seed, device=args.device))
    print(f"splats → {path} (point_cloud.ply, metrics.json, renders/)")
    return 0


def _command_weights(args) -> int:
    from .weights_cli import check_weights, list_weights

    return list_weights() if args.action == "list" else check_weights()


COMMANDS = {
    "run": _command_run, "pairs": _command_pairs, "extract": _command_extract, "match": _command_match,
    "sfm": _command_sfm, "export": _command_export, "eval": _command_eval, "weights": _command_weights,
    "splat": _command_splat,
}


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="[%(asctime)s %(name)s %(levelname)s] %(message)s", datefmt="%H:%M:%S")
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    if not args.verbose:
        import pycolmap

        # COLMAP's glog output belongs in its log files (OUT/sfm/colmap.log.*), not between progress bars.
        pycolmap.logging.alsologtostderr = False
    try:
        return COMMANDS[args.command](args)
    except ReconError as error:
        print(f"recon: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("recon: interrupted; finished work is saved, run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
