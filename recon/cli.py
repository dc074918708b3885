"""The `recon` command, generated from the stages' options dataclasses (recon.options).

`recon run` takes every option of every stage as a dotted flag (`--sfm.mapper global`, `--pairs.num-matched 30`,
`--dense.cell-size 8`) and the short names documented in the README (`--mapper`, `--features`, `--conf`,
`--matcher-conf`, `--export`, …); each stage command (`recon pairs|extract|match|sfm|export|splat`) takes its own
stage's options under their plain names. Backend options go through repeatable `--conf key=value` items (JSON
values, never evaluated). Errors derived from ReconError print one line and exit with their code (2 for bad
input or options); SIGTERM is turned into KeyboardInterrupt so every open output file is published first.
"""

from __future__ import annotations

import argparse
import errno
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from feature_backends.errors import ReconError
from pairs.planner import PairOptions

from .executor import ExecutorOptions
from .export import ExportOptions
from .extract import ExtractOptions
from .frames import FrameOptions
from .match import MatchOptions
from .options import add_options, build_options
from .pipeline import RunConfig
from .report import ReportOptions
from .sfm import SfMOptions
from .splat import SplatConfig

logger = logging.getLogger("recon")


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors on one line (exit 2), like every other recon error."""

    def error(self, message: str):
        self.exit(2, f"recon: error: {message} (see '{self.prog} --help')\n")


def _command(commands, name: str, help_text: str, *positionals: tuple[str, dict]) -> argparse.ArgumentParser:
    parser = commands.add_parser(name, help=help_text, description=help_text)
    for positional, keywords in positionals:
        parser.add_argument(positional, **keywords)
    return parser


PATH = {"type": Path}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="recon", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = _command(commands, "run", "photos or videos → (frames →) pairs → features → matches → SfM → exports",
                   ("inputs", {"type": Path, "nargs": "+", "metavar": "INPUT",
                               "help": "an image folder, or one or more videos / folders holding videos"}),
                   ("out", PATH))
    add_options(run, RunConfig, run=True)

    frames = _command(commands, "frames", "videos → OUT/frames/<video>/t<seconds>.jpg keyframes + OUT/frames.json",
                      ("inputs", {"type": Path, "nargs": "+", "metavar": "INPUT"}), ("out", PATH))
    add_options(frames, FrameOptions)

    pairs = _command(commands, "pairs", "write pairs.txt (+ pairs-stats.json, global-feats.h5)",
                     ("images", PATH), ("output", PATH))
    add_options(pairs, PairOptions)
    add_options(pairs, ExecutorOptions)
    pairs.add_argument("--device", default=None)

    extract = _command(commands, "extract", "write features.h5 (hloc layout)", ("images", PATH), ("output", PATH))
    add_options(extract, ExtractOptions)
    add_options(extract, ExecutorOptions)
    extract.add_argument("--device", default=None)

    match = _command(commands, "match", "write matches.h5 (hloc layout)",
                     ("pairs", PATH), ("features", PATH), ("output", PATH))
    add_options(match, MatchOptions)
    add_options(match, ExecutorOptions)
    match.add_argument("--device", default=None)

    sfm = _command(commands, "sfm", "COLMAP database, verification and mapping → OUT/sparse/0",
                   ("images", PATH), ("out", PATH))
    for name in ("pairs", "features", "matches"):
        sfm.add_argument(f"--{name}", type=Path, help=f"default: OUT/{name}{'.txt' if name == 'pairs' else '.h5'}")
    add_options(sfm, SfMOptions)

    export = _command(commands, "export", "export OUT/sparse/0", ("out", PATH))
    add_options(export, ExportOptions)
    export.add_argument("--images", type=Path, help="image folder (default: the one the SfM stage recorded)")

    from .eval import build_parser as build_eval_parser

    build_eval_parser(commands.add_parser("eval", help="compare a model with ground-truth cameras (pose AUC)"))

    splat = _command(commands, "splat", "train Gaussian splats on OUT/undistorted (gsplat; CPU reference path "
                                        "without CUDA)", ("out", PATH))
    add_options(splat, SplatConfig)

    report = _command(commands, "report", "write OUT/report.html for any output folder (recon's or hloc's files: "
                                          "features.h5, pairs.txt, sfm/database.db, sparse/N)", ("out", PATH))
    add_options(report, ReportOptions)
    report.add_argument("--images", type=Path, help="image folder (default: the one the run recorded)")

    weights = commands.add_parser("weights", help="list or verify weight files")
    weights.add_argument("action", choices=["list", "check"])
    return parser


def _command_run(args) -> int:
    from .pipeline import run

    result = run(args.inputs, args.out, build_options(RunConfig, args))
    print(result.summary())
    return 0


def _command_frames(args) -> int:
    from .frames import FRAMES_RECORD, frame_names, write_frames

    frames_dir = write_frames(args.inputs, args.out, build_options(FrameOptions, args))
    print(f"{len(frame_names(args.out))} images → {frames_dir} (decisions per frame in {args.out / FRAMES_RECORD})")
    return 0


def _command_pairs(args) -> int:
    from .pairs import plan_pairs

    plan = plan_pairs(args.images, args.output, build_options(PairOptions, args), device=args.device,
                      executor=build_options(ExecutorOptions, args))
    stats = args.output.with_name(args.output.stem + "-stats.json")
    print(f"{len(plan.pairs)} pairs ({plan.method}) → {args.output} (per-source counts in {stats})")
    return 0


def _command_extract(args) -> int:
    from .extract import extract

    extract(build_options(ExtractOptions, args), args.images, args.output, device=args.device,
            executor=build_options(ExecutorOptions, args))
    print(f"features → {args.output}")
    return 0


def _command_match(args) -> int:
    from .dense import is_dense_matcher
    from .match import match

    options = build_options(MatchOptions, args)
    if is_dense_matcher(options.matcher):
        raise ReconError(f"'{options.matcher}' is a dense matcher: it writes keypoints too; run it with "
                         "`recon run … --matcher NAME`")
    match(options, args.pairs, args.features, args.output, device=args.device,
          executor=build_options(ExecutorOptions, args))
    print(f"matches → {args.output}")
    return 0


def _command_sfm(args) -> int:
    from .sfm import reconstruct

    pairs = args.pairs or args.out / "pairs.txt"
    features = args.features or args.out / "features.h5"
    matches = args.matches or args.out / "matches.h5"
    options = build_options(SfMOptions, args)
    options.check()
    result = reconstruct(args.out, args.images, pairs, features, matches, options)
    print(f"{result.num_registered}/{result.num_images} registered, {result.num_points} points, "
          f"reprojection error {result.mean_reprojection_error:.3f} px → {result.sparse_dir}")
    return 0


def _command_export(args) -> int:
    from .export import export

    for fmt, path in export(args.out, build_options(ExportOptions, args), args.images).items():
        print(f"{fmt} → {path}")
    return 0


def _command_eval(args) -> int:
    from .eval import run_from_args

    run_from_args(args)
    return 0


def _command_splat(args) -> int:
    from .splat import splat

    path = splat(args.out, build_options(SplatConfig, args))
    print(f"splats → {path} (point_cloud.ply, metrics.json, renders/)")
    if (Path(args.out) / "report.html").is_file():  # a report exists: refresh it with the splats' curve and renders
        from .report import write_report

        try:
            print(f"report → {write_report(args.out)}")
        except Exception as error:  # noqa: BLE001 (trained splats are never lost to the report)
            logger.warning("report.html not refreshed (%s: %s); `recon report %s` retries", type(error).__name__,
                           error, args.out)
    return 0


def _command_report(args) -> int:
    from .report import read_report_data, write_report

    path = write_report(args.out, build_options(ReportOptions, args), args.images)
    views = read_report_data(path)["views"]
    print(f"{sum(v['registered'] for v in views)} / {len(views)} views registered → {path}")
    return 0


def _command_weights(args) -> int:
    from .weights_cli import check_weights, list_weights

    return list_weights() if args.action == "list" else check_weights()


COMMANDS = {
    "run": _command_run, "frames": _command_frames, "pairs": _command_pairs, "extract": _command_extract, "match": _command_match,
    "sfm": _command_sfm, "export": _command_export, "eval": _command_eval, "weights": _command_weights,
    "splat": _command_splat, "report": _command_report,
}


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except ReconError as error:  # raised by a flag's own parser (an image list that does not exist, …)
        print(f"recon: error: {error}", file=sys.stderr)
        return error.exit_code
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
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        print(f"recon: error: {error.strerror}: '{error.filename}'; free space or choose a writable output folder",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("recon: interrupted; finished work is saved, run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
