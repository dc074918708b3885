"""The generated command line (recon.options, recon.cli): every documented flag keeps its meaning, every option of
every stage is reachable, and bad options end with one line and exit 2 before any work is done."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from feature_backends.errors import ConfigError
from pairs.planner import PairOptions
from recon.cli import build_parser, main
from recon.dense import DenseOptions
from recon.export import ExportOptions
from recon.extract import ExtractOptions
from recon.match import MatchOptions
from recon.options import build_options
from recon.pipeline import RunConfig
from recon.sfm import SfMOptions
from recon.splat import SplatConfig

README = Path(__file__).resolve().parents[1] / "README.md"


def parse_run(*flags: str) -> RunConfig:
    args = build_parser().parse_args(["run", "images", "out", *flags])
    return build_options(RunConfig, args)


def test_documented_flags_keep_their_meaning():
    config = parse_run(
        "--features", "disk", "--matcher", "lightglue", "--conf", "nms=4", "--matcher-conf", "filter_threshold=0.2",
        "--mapper-option", "mapper.init_min_num_inliers=50", "--max-keypoints", "2048", "--resize-max", "1024",
        "--ratio", "0.8", "--export", "ply,3dgs", "--weights", "w.pth", "--pairs", "sequential", "--overlap", "8",
        "--loop-closure", "--loop-every", "5", "--num-matched", "7", "--gps", "--mapper", "global",
        "--camera-mode", "per-folder", "--refine-principal-point", "never", "--splat", "--splat-iterations", "100",
        "--splat-strategy", "mcmc", "--device", "cpu", "--retrieval", "netvlad", "--retrieval-conf", "whiten=false")
    assert config.extract == ExtractOptions("disk", {"nms": 4}, max_keypoints=2048, resize_max=1024, weights="w.pth")
    assert config.extract.backend_conf() == {"name": "disk", "nms": 4, "max_keypoints": 2048, "resize_max": 1024,
                                             "weights": "w.pth"}
    assert config.match.backend_conf() == {"name": "lightglue", "filter_threshold": 0.2, "ratio_threshold": 0.8}
    assert config.sfm.mapper == "global" and config.sfm.camera_mode == "per-folder"
    assert config.sfm.mapper_options == {"mapper": {"init_min_num_inliers": 50}}
    assert config.sfm.refine_principal_point == "never"
    assert config.export.formats == ("ply", "3dgs")
    assert (config.pairs.method, config.pairs.overlap, config.pairs.loop_closure, config.pairs.loop_every,
            config.pairs.num_matched, config.pairs.gps_prior) == ("sequential", 8, True, 5, 7, True)
    assert config.pairs.retrieval == "netvlad" and config.pairs.retrieval_conf == {"whiten": False}
    assert config.train_splats and config.splat.iterations == 100 and config.splat.strategy == "mcmc"
    assert config.device == "cpu"


def test_every_option_of_every_stage_is_reachable_from_recon_run():
    """Each field has a dotted flag on `recon run`; set each to a non-default value and read it back."""
    parser = build_parser()
    run_flags = {option for action in parser._subparsers._group_actions[0].choices["run"]._actions
                 for option in action.option_strings}
    missing = []
    for prefix, cls in [("pairs", PairOptions), ("extract", ExtractOptions), ("match", MatchOptions),
                        ("dense", DenseOptions), ("sfm", SfMOptions), ("export", ExportOptions),
                        ("splat", SplatConfig)]:
        for field in cls.__dataclass_fields__.values():
            if field.metadata.get("cli", True) and f"--{prefix}.{field.name.replace('_', '-')}" not in run_flags:
                missing.append(f"{prefix}.{field.name}")
    assert not missing
    config = parse_run(
        "--pairs.spatial-min-neighbors", "3", "--no-pairs.per-folder", "--sfm.min-match-score", "0.5",
        "--sfm.verification-max-error", "3", "--dense.cell-size", "8", "--splat.eval-every", "4",
        "--no-pairs.spatial-ignore-z", "--splat.cpu-max-side", "160")
    assert config.pairs.spatial_min_neighbors == 3 and not config.pairs.per_folder
    assert not config.pairs.spatial_ignore_z
    assert config.sfm.min_match_score == 0.5 and config.sfm.verification_max_error == 3.0
    assert config.dense.cell_size == 8 and config.splat.eval_every == 4 and config.splat.cpu_max_side == 160


def test_defaults_live_in_one_place():
    """Nothing given: every stage's options equal its dataclass defaults, and `recon pairs` plans like `recon run`."""
    assert parse_run() == RunConfig()
    pairs_args = build_parser().parse_args(["pairs", "images", "pairs.txt"])
    assert build_options(PairOptions, pairs_args) == RunConfig().pairs
    assert RunConfig().pairs.method == "auto"


def test_readme_flags_are_all_accepted():
    """Every --flag the README's command-line section shows exists on the command it is shown with."""
    text = README.read_text()
    section = "\n".join(re.findall(r"```bash\n(.*?)```", text[text.index("## Command line"):], flags=re.S))
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    unknown = []
    command = None
    for line in section.splitlines():
        words = line.split()
        if len(words) > 1 and words[0] in ("recon", ".venv/bin/recon") and words[1] in commands:
            command = words[1]
        if command is None:
            continue
        known = {option for action in commands[command]._actions for option in action.option_strings}
        for flag in re.findall(r"(?<![\w-])(--[a-z][\w.-]*)", line):
            if flag not in known:
                unknown.append(f"recon {command} {flag}")
    assert not unknown


def test_readme_command_lines_parse():
    """The complete command lines in the README (those starting with `recon` or `.venv/bin/recon`) parse."""
    parser = build_parser()
    code = "\n".join(re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S))
    lines = [line.strip() for line in code.splitlines()
             if re.match(r"\s*(\.venv/bin/)?recon \w+ ", line) and "[" not in line and "|" not in line]
    assert len(lines) >= 3
    for line in lines:
        words = shlex.split(line.split("#")[0])[1:]
        parser.parse_args(words)


@pytest.mark.parametrize("flags, message", [
    (["--mapper-option", "mapper.no_such_option=1"], "unknown pycolmap option 'mapper.no_such_option'"),
    (["--mapper-option", "mapper.init_min_num_inliers=abc"], "init_min_num_inliers='abc': expected a value"),
    (["--conf", "contrast_threshold=abc"], "'SIFT.contrast_threshold' takes a float"),
    (["--export", "ply,obj"], "unknown export format 'obj'"),
    (["--camera-model", "PINHOLEE"], "unknown camera model 'PINHOLEE'"),
    (["--max-keypoints", "many"], "invalid int value: 'many'"),
])
def test_bad_options_exit_2_with_one_line_before_any_work(synthetic_scene, tmp_path, capsys, flags, message):
    out = tmp_path / "out"
    assert exit_code(["run", str(synthetic_scene / "images"), str(out), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()  # refused before any stage ran


def exit_code(argv: list[str]) -> int:
    """main()'s exit status, whether it returns it or argparse exits with it."""
    try:
        return main(argv)
    except SystemExit as exit:
        return exit.code


def test_missing_matcher_weights_end_the_run_before_extraction(synthetic_scene, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RECON_OFFLINE", "1")
    monkeypatch.setenv("RECON_WEIGHTS_DIR", str(tmp_path / "weights"))
    monkeypatch.setattr("torch.hub.get_dir", lambda: str(tmp_path / "hub"))
    code = main(["run", str(synthetic_scene / "images"), str(tmp_path / "out"), "--features", "sift",
                 "--matcher", "lightglue"])
    err = capsys.readouterr().err
    assert code == 2 and "sift_lightglue.pth" in err and "official URL" in err
    assert not (tmp_path / "out" / "features.h5").exists()


def test_options_reject_unknown_values_in_python_too():
    with pytest.raises(ConfigError, match="unknown pycolmap option"):
        SfMOptions(mapper_options={"mapper": {"nope": 1}}).check()
    with pytest.raises(ConfigError, match="unknown export format"):
        ExportOptions(formats=("obj",)).check()
