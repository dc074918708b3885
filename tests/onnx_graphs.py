"""Small ONNX graphs with the input/output contracts of published graphs (LoMa as COLMAP runs it, OmniGlue's
export), built with onnx.helper for the tests: the real graphs cannot be downloaded here.

Each graph computes something simple whose answer the tests know, so that what the backends feed in (layout,
coordinate conventions, dtypes) and read back is checked, not just the plumbing."""

from __future__ import annotations

from pathlib import Path

import numpy as np

onnx = None


def _onnx():
    global onnx
    import onnx as module

    onnx = module
    return module


def _save(nodes, inputs, outputs, initializers, path: Path) -> Path:
    helper = _onnx().helper
    graph = helper.make_graph(nodes, path.stem, inputs, outputs, initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _const(name: str, value) -> "onnx.TensorProto":
    return _onnx().numpy_helper.from_array(np.asarray(value), name)


def _io(name: str, dtype: int, shape):
    return _onnx().helper.make_tensor_value_info(name, dtype, shape)


def brightest_pixels_detector(path: Path) -> Path:
    """image (1,3,H,W), num_keypoints (1,) → the num_keypoints brightest pixels (channel mean) as keypoints
    (1,K,2) in [-1,1] with corners at ±1 (pixel centres at (2i+1)/W - 1), keypoint_probs (1,K) = brightness."""
    helper, T = _onnx().helper, _onnx().TensorProto
    n = helper.make_node
    nodes = [
        n("ReduceMean", ["image"], ["gray"], axes=[1], keepdims=0),
        n("Shape", ["image"], ["shape"]),
        n("Gather", ["shape", "i3"], ["width"]),
        n("Reshape", ["gray", "flat_shape"], ["flat"]),
        n("TopK", ["flat", "num_keypoints"], ["keypoint_probs", "index"], axis=1),
        n("Mod", ["index", "width"], ["col"]),
        n("Div", ["index", "width"], ["row"]),
        n("Gather", ["shape", "i2"], ["height"]),
        *[n("Cast", [a], [a + "_f"], to=T.FLOAT) for a in ("col", "row", "width", "height")],
        n("Add", ["col_f", "half"], ["col_c"]), n("Add", ["row_f", "half"], ["row_c"]),
        n("Div", ["col_c", "width_f"], ["col_u"]), n("Div", ["row_c", "height_f"], ["row_u"]),
        n("Mul", ["col_u", "two"], ["col_2"]), n("Mul", ["row_u", "two"], ["row_2"]),
        n("Sub", ["col_2", "one"], ["x"]), n("Sub", ["row_2", "one"], ["y"]),
        n("Unsqueeze", ["x", "axis_last"], ["x1"]), n("Unsqueeze", ["y", "axis_last"], ["y1"]),
        n("Concat", ["x1", "y1"], ["keypoints"], axis=-1),
    ]
    constants = [_const("i3", np.int64(3)), _const("i2", np.int64(2)), _const("flat_shape", np.array([1, -1])),
                 _const("half", np.float32(0.5)), _const("two", np.float32(2)), _const("one", np.float32(1)),
                 _const("axis_last", np.array([-1]))]
    inputs = [_io("image", T.FLOAT, [1, 3, "H", "W"]), _io("num_keypoints", T.INT64, [1])]
    outputs = [_io("keypoints", T.FLOAT, [1, "K", 2]), _io("keypoint_probs", T.FLOAT, [1, "K"])]
    return _save(nodes, inputs, outputs, constants, path)


def colour_descriptor(path: Path, dim: int = 8, size: int = 784) -> Path:
    """image (1,3,S,S), keypoints (1,N,2) → descriptions (1,N,dim): the bilinear colour at each keypoint
    (grid_sample, align_corners=0) times a fixed (3, dim) matrix [I | I | ...]."""
    helper, T = _onnx().helper, _onnx().TensorProto
    n = helper.make_node
    projection = np.tile(np.eye(3, dtype=np.float32), (1, -(-dim // 3)))[:, :dim]
    nodes = [
        n("Unsqueeze", ["keypoints", "axis1"], ["grid"]),  # (1,1,N,2)
        n("GridSample", ["image", "grid"], ["sampled"], align_corners=0, mode="bilinear"),  # (1,3,1,N)
        n("Squeeze", ["sampled", "axis2"], ["colours"]),  # (1,3,N)
        n("Transpose", ["colours"], ["colours_t"], perm=[0, 2, 1]),
        n("MatMul", ["colours_t", "projection"], ["descriptions"]),
    ]
    constants = [_const("axis1", np.array([1])), _const("axis2", np.array([2])), _const("projection", projection)]
    inputs = [_io("image", T.FLOAT, [1, 3, size, size]), _io("keypoints", T.FLOAT, [1, "N", 2])]
    return _save(nodes, inputs, [_io("descriptions", T.FLOAT, [1, "N", dim])], constants, path)


def nearest_position_matcher(path: Path, names=("kpts0", "kpts1", "desc0", "desc1"),
                             outputs=("m0", "mscores0", "m1", "mscores1"), dim: int | None = None) -> Path:
    """Match every keypoint of image 0 to the keypoint of image 1 nearest in normalised coordinates, scored
    exp(-100 d^2) + 0 * (desc0 . desc1) (the descriptors are read, so their layout must fit). m1/mscores1 the
    same from image 1's side."""
    helper, T = _onnx().helper, _onnx().TensorProto
    n = helper.make_node
    k0, k1, d0, d1 = names
    nodes = [
        n("Unsqueeze", [k0, "axis2"], ["a"]), n("Unsqueeze", [k1, "axis1"], ["b"]),  # (1,N0,1,2), (1,1,N1,2)
        n("Sub", ["a", "b"], ["diff"]), n("Mul", ["diff", "diff"], ["sq"]),
        n("ReduceSum", ["sq", "axis_last"], ["dist2"], keepdims=0),  # (1,N0,N1)
        n("Mul", ["dist2", "minus100"], ["logit"]),
        n("Transpose", [d1], ["d1t"], perm=[0, 2, 1]), n("MatMul", [d0, "d1t"], ["sim"]),
        n("Mul", ["sim", "zero"], ["sim0"]), n("Add", ["logit", "sim0"], ["logits"]), n("Exp", ["logits"], ["p"]),
        n("ArgMax", ["p"], [outputs[0]], axis=2, keepdims=0), n("ReduceMax", ["p"], [outputs[1]], axes=[2], keepdims=0),
        n("ArgMax", ["p"], [outputs[2]], axis=1, keepdims=0), n("ReduceMax", ["p"], [outputs[3]], axes=[1], keepdims=0),
    ]
    constants = [_const("axis1", np.array([1])), _const("axis2", np.array([2])), _const("axis_last", np.array([-1])),
                 _const("minus100", np.float32(-100)), _const("zero", np.float32(0))]
    inputs = [_io(k0, T.FLOAT, [1, "N0", 2]), _io(k1, T.FLOAT, [1, "N1", 2]),
              _io(d0, T.FLOAT, [1, "N0", dim or "D"]), _io(d1, T.FLOAT, [1, "N1", dim or "D"])]
    outs = [_io(outputs[0], T.INT64, [1, "N0"]), _io(outputs[1], T.FLOAT, [1, "N0"]),
            _io(outputs[2], T.INT64, [1, "N1"]), _io(outputs[3], T.FLOAT, [1, "N1"])]
    return _save(nodes, inputs, outs, constants, path)


def bright_superpoint(path: Path, dim: int = 256) -> Path:
    """sp_v6's contract: 'superpoint/image:0' (1,H,W,1) → 'superpoint/prob_nms:0' (1,H,W) = max(image - 0.5, 0)
    and 'superpoint/descriptors:0' (1,H,W,dim) = image x [1, 2, ..., dim] / dim."""
    helper, T = _onnx().helper, _onnx().TensorProto
    n = helper.make_node
    nodes = [n("Sub", ["superpoint/image:0", "half"], ["centred"]), n("Relu", ["centred"], ["relu"]),
             n("Squeeze", ["relu", "axis_last"], ["superpoint/prob_nms:0"]),
             n("Mul", ["superpoint/image:0", "ramp"], ["superpoint/descriptors:0"])]
    constants = [_const("half", np.float32(0.5)), _const("axis_last", np.array([-1])),
                 _const("ramp", (np.arange(1, dim + 1, dtype=np.float32) / dim))]
    inputs = [_io("superpoint/image:0", T.FLOAT, [1, "H", "W", 1])]
    outputs = [_io("superpoint/prob_nms:0", T.FLOAT, [1, "H", "W"]),
               _io("superpoint/descriptors:0", T.FLOAT, [1, "H", "W", dim])]
    return _save(nodes, inputs, outputs, constants, path)


def nearest_position_omniglue(path: Path) -> Path:
    """OmniGlue's contract: keypoints/descriptors/scores/descriptors_dino/width/height per image →
    soft_assignment (1,N0+1,N1+1) = exp(-100 |k0/size0 - k1/size1|^2) (+ 0 x every descriptor product), dustbins 0."""
    helper, T = _onnx().helper, _onnx().TensorProto
    n = helper.make_node
    nodes = []
    for i in "01":
        nodes += [n("Concat", [f"width{i}", f"height{i}"], [f"size{i}"], axis=0),
                  n("Cast", [f"size{i}"], [f"size{i}_f"], to=T.FLOAT),
                  n("Div", [f"keypoints{i}", f"size{i}_f"], [f"unit{i}"]),
                  n("Concat", [f"descriptors{i}", f"descriptors{i}_dino", f"scores{i}"], [f"all{i}"], axis=2)]
    nodes += [n("Unsqueeze", ["unit0", "axis2"], ["a"]), n("Unsqueeze", ["unit1", "axis1"], ["b"]),
              n("Sub", ["a", "b"], ["diff"]), n("Mul", ["diff", "diff"], ["sq"]),
              n("ReduceSum", ["sq", "axis_last"], ["dist2"], keepdims=0), n("Mul", ["dist2", "minus100"], ["logit"]),
              n("Transpose", ["all1"], ["all1t"], perm=[0, 2, 1]), n("MatMul", ["all0", "all1t"], ["sim"]),
              n("Mul", ["sim", "zero"], ["sim0"]), n("Add", ["logit", "sim0"], ["logits"]),
              n("Exp", ["logits"], ["p"]), n("Pad", ["p", "pads"], ["soft_assignment"])]
    constants = [_const("axis1", np.array([1])), _const("axis2", np.array([2])), _const("axis_last", np.array([-1])),
                 _const("minus100", np.float32(-100)), _const("zero", np.float32(0)),
                 _const("pads", np.array([0, 0, 0, 0, 1, 1]))]
    inputs = []
    for i in "01":
        inputs += [_io(f"keypoints{i}", T.FLOAT, [1, f"N{i}", 2]), _io(f"descriptors{i}", T.FLOAT, [1, f"N{i}", 256]),
                   _io(f"scores{i}", T.FLOAT, [1, f"N{i}", 1]),
                   _io(f"descriptors{i}_dino", T.FLOAT, [1, f"N{i}", 768]),
                   _io(f"width{i}", T.INT32, [1]), _io(f"height{i}", T.INT32, [1])]
    outputs = [_io("soft_assignment", T.FLOAT, [1, "M0", "M1"])]
    return _save(nodes, inputs, outputs, constants, path)
