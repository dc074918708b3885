"""Generated scenes with known poses, for the examples, tests and benchmarks.

`make_scene`: pycolmap synthesizes a reconstruction and renders one textured patch per 3D point
(`synthesize_dataset` + `synthesize_images`); this only picks settings that a feature pipeline can
actually solve. Patches are drawn per point, so dense point sets overlap into mush; 150 points at
640x480 over 12 frames registers every frame with COLMAP's own SIFT pipeline, 400 points only 2 of 12.

`make_plane_scene`: textured planes ray-cast from known cameras, for dense matchers, which need a
known correspondence at every pixel rather than at a few sparse points.

`mixed_scenes`: the photos of several real scenes in one folder, named `<scene>__<file>`, for retrieval, whose
right answer (a neighbour from the same scene) is then known from the names. The exact dense warps of the
generated scenes (matchers that know the answer) are in recon.oracles."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pycolmap

from .eval import CameraGT as Camera  # K, R, t with x_cam = R X + t; pixels in COLMAP's convention (centres at +0.5)


@dataclass(frozen=True, kw_only=True)
class SceneSpec:
    num_frames: int = 12
    num_points: int = 150
    width: int = 640
    height: int = 480
    focal: float = 800.0
    seed: int = 0


def make_scene(out_dir: str | Path, spec: SceneSpec = SceneSpec()) -> Path:
    """Write `out_dir/images/*.png` and the ground-truth model `out_dir/gt/`; return out_dir.

    The ground truth is a COLMAP text+binary model whose image names match the PNG names, so
    `recon eval OUT/sparse/0 --gt out_dir/gt` compares against it directly.
    """
    out_dir = Path(out_dir)
    image_dir = out_dir / "images"
    gt_dir = out_dir / "gt"
    image_dir.mkdir(parents=True, exist_ok=True)
    gt_dir.mkdir(parents=True, exist_ok=True)

    options = pycolmap.SyntheticDatasetOptions()
    options.num_rigs = 1
    options.num_cameras_per_rig = 1
    options.num_frames_per_rig = spec.num_frames
    options.num_points3D = spec.num_points
    options.camera_width = spec.width
    options.camera_height = spec.height
    options.camera_model_id = pycolmap.CameraModelId.SIMPLE_RADIAL
    options.camera_params = [spec.focal, spec.width / 2, spec.height / 2, 0.0]
    options.num_points2D_without_point3D = 0
    pycolmap.set_random_seed(spec.seed)
    reconstruction = pycolmap.synthesize_dataset(options)
    pycolmap.synthesize_images(pycolmap.SyntheticImageOptions(), reconstruction, image_dir)
    reconstruction.write(gt_dir)
    return out_dir


# ---------------------------------------------------------------------------------------------------------------
# Textured planes: a dense ground-truth correspondence at every pixel.
#
# pycolmap's scene above draws one small patch per 3D point, so only the points' projections have a known match;
# a dense matcher tested on it samples a handful of 5x5 spots and its tracks measure the spots, not the matcher.
# Here the scene is a few planes with multi-scale random texture, ray-cast from known pinhole cameras with
# occlusion, so the exact correspondence of every pixel of one frame in another frame (or its occlusion) is known.


def make_split_scene(out_dir: str | Path) -> tuple[Path, dict[str, str]]:
    """A folder where some views cannot join the main model, with each view's true reason (recon.report codes).

    `out_dir/images/`: 8 frames of `make_scene` (the main model), 5 frames of another generated scene mirrored
    left-right in `b/` (SIFT descriptors are not mirror-invariant, so they match only each other: a separate
    model when the mapper keeps 5-view models, `--mapper-option min_model_size=3`), a uniform grey frame (no
    keypoints) and a small random-noise frame (keypoints, but nothing it could verify against).
    """
    from PIL import Image, ImageOps

    out_dir = Path(out_dir)
    make_scene(out_dir / "a", SceneSpec(num_frames=8))
    make_scene(out_dir / "b", SceneSpec(num_frames=5, seed=1))
    image_dir = out_dir / "images"
    (image_dir / "b").mkdir(parents=True, exist_ok=True)
    reasons = {}
    for path in sorted((out_dir / "a" / "images").iterdir()):
        Image.open(path).save(image_dir / path.name)
        reasons[path.name] = "registered"
    for path in sorted((out_dir / "b" / "images").iterdir()):
        ImageOps.mirror(Image.open(path)).save(image_dir / "b" / path.name)
        reasons[f"b/{path.name}"] = "smaller_model"
    Image.new("RGB", (640, 480), (128, 128, 128)).save(image_dir / "blank.png")
    reasons["blank.png"] = "no_features"
    noise = np.random.default_rng(0).integers(0, 256, (120, 160, 3), dtype=np.uint8)
    Image.fromarray(noise).save(image_dir / "noise.png")
    reasons["noise.png"] = "no_verified_pair"
    return image_dir, reasons


@dataclass(frozen=True, kw_only=True)
class PlaneSceneSpec:
    num_frames: int = 12
    width: int = 640
    height: int = 480
    focal: float = 500.0
    distance: float = 6.0  # m from the look-at point
    arc_degrees: float = 50.0  # horizontal spread of the cameras around the look-at point
    texels_per_metre: float = 160.0  # about 2 texels per pixel at `distance`, so the texture never looks blocky
    supersample: int = 2  # rendered at this factor and area-averaged, so texture detail does not alias
    seed: int = 0


@dataclass(frozen=True)
class Plane:
    origin: tuple[float, float, float]  # a corner, world metres
    axis_u: tuple[float, float, float]  # unit vectors spanning the plane
    axis_v: tuple[float, float, float]
    extent: tuple[float, float]  # metres along axis_u, axis_v




def _rotated_panel(centre, yaw_deg: float, size: tuple[float, float]) -> Plane:
    yaw = np.deg2rad(yaw_deg)
    u = np.array([np.cos(yaw), 0.0, np.sin(yaw)])
    v = np.array([0.0, 1.0, 0.0])
    origin = np.asarray(centre, float) - u * size[0] / 2 - v * size[1] / 2
    return Plane(tuple(origin), tuple(u), tuple(v), size)


# World: x right, y down, z away from the cameras. A back wall, a floor and two panels at different depths and
# angles, so frames see parallax and occlusion (a homography alone would fit none of the frame pairs).
PLANES = (
    Plane((-7.0, -3.5, 3.0), (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (14.0, 5.5)),
    Plane((-7.0, 2.0, -2.5), (1.0, 0.0, 0.0), (0.0, 0.0, 1.0), (14.0, 5.5)),
    _rotated_panel((-1.0, 0.3, 0.6), 35.0, (1.8, 2.2)),
    _rotated_panel((1.3, -0.4, 1.4), -40.0, (1.6, 2.4)),
)
LOOK_AT = np.array([0.0, 0.2, 1.2])


def plane_texture(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """(H, W, 3) float32 in [0, 1]: random noise summed over octaves (bicubic, coarse octaves weigh a little more), so
    blobs and corners exist at every scale a detector or a matcher looks at."""
    import cv2

    texture = np.zeros((height, width, 3), np.float32)
    step = 2
    while step <= max(height, width) // 4:
        coarse = rng.random((height // step + 2, width // step + 2, 3)).astype(np.float32)
        texture += step**0.25 * cv2.resize(coarse, (width + 2 * step, height + 2 * step),
                                              interpolation=cv2.INTER_CUBIC)[step:step + height, step:step + width]
        step *= 2
    low, high = np.percentile(texture, (1, 99), axis=(0, 1))
    return np.clip((texture - low) / (high - low), 0, 1)


def plane_cameras(spec: PlaneSceneSpec) -> list[Camera]:
    K = np.array([[spec.focal, 0, spec.width / 2], [0, spec.focal, spec.height / 2], [0, 0, 1.0]])
    cameras = []
    for index in range(spec.num_frames):
        fraction = index / max(1, spec.num_frames - 1) - 0.5
        angle = np.deg2rad(spec.arc_degrees) * fraction
        height = -0.6 + 0.4 * np.sin(3.0 * np.pi * fraction)  # a little vertical motion, not a planar rig
        centre = LOOK_AT + np.array([spec.distance * np.sin(angle), height, -spec.distance * np.cos(angle)])
        forward = LOOK_AT - centre
        forward /= np.linalg.norm(forward)
        right = np.cross([0.0, 1.0, 0.0], forward)
        right /= np.linalg.norm(right)
        down = np.cross(forward, right)
        R = np.stack([right, down, forward])
        cameras.append(Camera(K, R, -R @ centre))
    return cameras


def cast_rays(camera: Camera, pixels: np.ndarray, planes=PLANES) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """First plane hit by the ray through each pixel (hloc convention: centre of the top-left pixel = (0, 0)).

    Returns (plane index or -1, depth along the optical axis, (s, t) metres on that plane), each per pixel.
    """
    homogeneous = np.concatenate([pixels + 0.5, np.ones((len(pixels), 1))], axis=1)
    directions = (np.linalg.inv(camera.K) @ homogeneous.T).T @ camera.R  # world directions with camera z = 1
    centre = camera.center
    best = np.full(len(pixels), np.inf)
    index = np.full(len(pixels), -1)
    coords = np.zeros((len(pixels), 2))
    for k, plane in enumerate(planes):
        origin, u, v = (np.asarray(a, float) for a in (plane.origin, plane.axis_u, plane.axis_v))
        normal = np.cross(u, v)
        facing = directions @ normal
        with np.errstate(divide="ignore", invalid="ignore"):
            depth = ((origin - centre) @ normal) / facing
        offset = centre + depth[:, None] * directions - origin
        s, t = offset @ u, offset @ v
        hit = (depth > 1e-6) & (s >= 0) & (s <= plane.extent[0]) & (t >= 0) & (t <= plane.extent[1]) & (depth < best)
        best[hit], index[hit] = depth[hit], k
        coords[hit] = np.stack([s[hit], t[hit]], axis=1)
    return index, best, coords


def pixel_grid(width: int, height: int) -> np.ndarray:
    ys, xs = np.mgrid[0:height, 0:width]
    return np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.float64)


@dataclass
class PlaneScene:
    spec: PlaneSceneSpec
    cameras: list[Camera]
    names: list[str]

    @classmethod
    def build(cls, spec: PlaneSceneSpec = PlaneSceneSpec()) -> PlaneScene:
        return cls(spec, plane_cameras(spec), [f"frame_{i:03d}.png" for i in range(spec.num_frames)])

    def render(self, index: int, textures: list[np.ndarray]) -> np.ndarray:
        """(H, W, 3) uint8 of frame `index`; pixels that hit no plane are black."""
        import cv2

        factor = self.spec.supersample
        camera = self.cameras[index]
        scaled = Camera(np.diag([factor, factor, 1.0]) @ camera.K, camera.R, camera.t)
        width, height = self.spec.width * factor, self.spec.height * factor
        plane, _, coords = cast_rays(scaled, pixel_grid(width, height))
        image = np.zeros((height * width, 3), np.float32)
        for k, texture in enumerate(textures):
            hit = plane == k
            maps = (coords[hit] * self.spec.texels_per_metre - 0.5).astype(np.float32)
            count = len(maps)
            rows = -(-count // 1024)  # remap wants a 2D map under 32767 per side
            maps = np.concatenate([maps, np.zeros((rows * 1024 - count, 2), np.float32)]).reshape(rows, 1024, 2)
            sampled = cv2.remap(texture, maps[..., 0], maps[..., 1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
            image[hit] = sampled.reshape(-1, 3)[:count]
        image = cv2.resize(image.reshape(height, width, 3), (self.spec.width, self.spec.height),
                           interpolation=cv2.INTER_AREA)
        return np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)

    def correspondence(self, index0: int, index1: int, pixels0: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Where pixels of frame index0 (hloc convention) are seen in frame index1, and whether they are: the
        point is on a plane, in front of camera 1, inside its image, and the first surface along its ray."""
        camera0, camera1 = self.cameras[index0], self.cameras[index1]
        plane, depth0, _ = cast_rays(camera0, pixels0)
        homogeneous = np.concatenate([pixels0 + 0.5, np.ones((len(pixels0), 1))], axis=1)
        depth0 = np.where(plane >= 0, depth0, 0.0)  # no surface: projected anywhere, marked invalid below
        world = camera0.center + (depth0[:, None] * (np.linalg.inv(camera0.K) @ homogeneous.T).T) @ camera0.R
        local = world @ camera1.R.T + camera1.t
        with np.errstate(divide="ignore", invalid="ignore"):
            projected = (local @ camera1.K.T)[:, :2] / local[:, 2:] - 0.5
        inside = (plane >= 0) & (local[:, 2] > 1e-6) & np.isfinite(projected).all(axis=1)
        inside &= (projected[:, 0] >= -0.5) & (projected[:, 0] < self.spec.width - 0.5)
        inside &= (projected[:, 1] >= -0.5) & (projected[:, 1] < self.spec.height - 0.5)
        seen = np.zeros(len(pixels0), bool)
        if inside.any():
            plane1, depth1, _ = cast_rays(camera1, projected[inside])
            seen[inside] = (plane1 == plane[inside]) & (np.abs(depth1 - local[inside, 2]) < 1e-6 * depth1)
        return np.where(seen[:, None], projected, -1.0).astype(np.float64), seen

    def write_ground_truth(self, path: Path) -> Path:
        """Middlebury `*_par.txt` (K, R, t per image), which `recon eval --gt` reads."""
        lines = [str(len(self.names))]
        for name, camera in zip(self.names, self.cameras):
            values = [*camera.K.ravel(), *camera.R.ravel(), *camera.t.ravel()]
            lines.append(name + " " + " ".join(f"{v:.12g}" for v in values))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines) + "\n")
        return path


def make_plane_scene(out_dir: str | Path, spec: PlaneSceneSpec = PlaneSceneSpec()) -> Path:
    """Write `out_dir/images/frame_*.png` and `out_dir/gt/planes_par.txt`; return out_dir.
    `PlaneScene.build(spec)` recreates the exact geometry (for ground-truth correspondences) from `spec` alone."""
    from PIL import Image

    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    scene = PlaneScene.build(spec)
    rng = np.random.default_rng(spec.seed)
    textures = [plane_texture(int(p.extent[1] * spec.texels_per_metre), int(p.extent[0] * spec.texels_per_metre), rng)
                for p in PLANES]
    for index, name in enumerate(scene.names):
        Image.fromarray(scene.render(index, textures)).save(out_dir / "images" / name)
    scene.write_ground_truth(out_dir / "gt" / "planes_par.txt")
    (out_dir / "scene.json").write_text(json.dumps(asdict(spec)))
    return out_dir


def load_plane_scene(out_dir: str | Path) -> PlaneScene:
    return PlaneScene.build(PlaneSceneSpec(**json.loads((Path(out_dir) / "scene.json").read_text())))


# ---------------------------------------------------------------------------------------------------------------
# A video of the plane scene: the camera sweeps the arc at `fps`; some frames are repeated (a stalled camera, the
# duplicates some phones write) and some are followed by a motion-blurred copy, so keyframe selection has known
# answers: which video frames are duplicates, which are blurred, and the ground-truth pose of every frame.


@dataclass(frozen=True, kw_only=True)
class VideoSpec:
    duplicates: tuple[int, ...] = ()  # source frames written twice
    blurred: tuple[int, ...] = ()  # source frames followed by a motion-blurred copy of themselves
    hold: tuple[int, int] | None = None  # (source frame, extra copies): the camera stands still
    blur_px: int = 15  # length of the horizontal motion-blur kernel
    fps: float = 30.0


def make_plane_video(path: str | Path, spec: PlaneSceneSpec, video: VideoSpec = VideoSpec()) -> list[dict]:
    """Write an MP4 (OpenCV's mp4v encoder) of the plane scene; return per video frame its source frame index
    and kind ("frame", "duplicate", "blurred"). `PlaneScene.build(spec).cameras[source]` is its true pose."""
    import cv2

    scene = PlaneScene.build(spec)
    rng = np.random.default_rng(spec.seed)
    textures = [plane_texture(int(p.extent[1] * spec.texels_per_metre), int(p.extent[0] * spec.texels_per_metre), rng)
                for p in PLANES]
    kernel = np.zeros((video.blur_px, video.blur_px), np.float32)
    kernel[video.blur_px // 2] = 1.0 / video.blur_px
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), video.fps, (spec.width, spec.height))
    if not writer.isOpened():
        raise RuntimeError(f"OpenCV cannot write '{path}'")
    writer.set(cv2.VIDEOWRITER_PROP_QUALITY, 100)
    frames = []
    for source in range(spec.num_frames):
        image = cv2.cvtColor(scene.render(source, textures), cv2.COLOR_RGB2BGR)
        copies = [("frame", image)]
        if source in video.duplicates:
            copies.append(("duplicate", image))
        if video.hold and video.hold[0] == source:
            copies += [("duplicate", image)] * video.hold[1]
        if source in video.blurred:
            copies.append(("blurred", cv2.filter2D(image, -1, kernel)))
        for kind, frame in copies:
            writer.write(frame)
            frames.append({"source": source, "kind": kind})
    writer.release()
    return frames


MIXED_SCENES = ("fountain_p11", "sacre_coeur", "sceaux_castle", "temple_ring")


def mixed_scenes(data_dir: str | Path, out_dir: str | Path, scenes: tuple[str, ...] = MIXED_SCENES,
                 max_side: int | None = 640) -> Path:
    """Every photo of `data_dir/<scene>` (searched recursively) as `out_dir/<scene>__<stem>.jpg`, its longer side
    brought down to `max_side` (VLAD describes at 640 px anyway; decoding 6-Mpixel originals would dominate a
    test's time); `max_side=None` links the originals as they are. Raises FileNotFoundError naming a scene that
    has no photos."""
    from PIL import Image, ImageOps

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for scene in scenes:
        files = [f for f in sorted((Path(data_dir) / scene).rglob("*")) if f.suffix.lower() in (".jpg", ".png")]
        if not files:
            raise FileNotFoundError(f"{scene} has no images in {data_dir}")
        for file in files:
            if max_side is None:
                (out_dir / f"{scene}__{file.name}").symlink_to(file)
                continue
            with Image.open(file) as image:
                image.draft("RGB", (max_side, max_side))
                image = ImageOps.exif_transpose(image).convert("RGB")
                image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
                image.save(out_dir / f"{scene}__{file.stem}.jpg", quality=95)
    return out_dir
