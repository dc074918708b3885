"""Generate a scene with known poses: OUT/images/*.png and the ground-truth COLMAP model OUT/gt/.

    python examples/make_scene.py out/demo/scene [--frames 12 --points 150]
    recon run out/demo/scene/images out/demo/recon
    recon eval out/demo/recon/sparse/0 --gt out/demo/scene/gt
"""

import argparse

from recon.synthetic import SceneSpec, make_scene

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("out")
parser.add_argument("--frames", type=int, default=12)
parser.add_argument("--points", type=int, default=150, help="keep it sparse: one textured patch is drawn per point")
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()
path = make_scene(args.out, SceneSpec(num_frames=args.frames, num_points=args.points, seed=args.seed))
print(f"scene with known poses → {path}/images (ground truth: {path}/gt)")
