"""Harness for the parity tests: the reference Sparse4Dv3 (HorizonRobotics/Sparse4D c41df4bb) on the same
weights and inputs as ours.

The reference checkout is found at ``$SPARSE4D_REFERENCE`` or ``<repo>/../shared/reference/Sparse4D``; tests
call :func:`require_reference`, which skips with the reason when it is absent. Its model code runs on a CPU with
these workarounds (nothing else of it is changed):

* only ``projects.mmdet3d_plugin.models`` and ``.ops`` are imported (their parent packages are registered as
  empty packages, so the dataset and training code that pull in nuScenes, IPython, ... are never imported);
* its compiled op ``deformable_aggregation_ext`` is not built: a stand-in module computes its forward and
  backward with ``tests/kernel_oracle.py`` (a transcription of the CUDA kernel's arithmetic), so the
  reference runs its op path (``use_deformable_func=True``, as its config); on CUDA tensors the stand-in calls
  the compiled op instead where it was built and is importable; in float64 the reference's
  ``deformable_aggregation_function`` (which casts to float32) is served by the oracle directly;
* its unconditional ``.cuda()`` calls (grid mask, ``instance_id``) are no-ops while it runs on a CPU;
* its ``FocalLoss`` sees negative denoising targets (-1, -3) as background, as mmcv's CUDA op does (mmdet's
  CPU path one-hot encodes the targets and cannot take negative ones);
* with ``model.loss.detach_centerness_target`` (the Ascend port's training, the seed profiles), its centerness loss
  runs mmdet's ``binary_cross_entropy`` with the port's ``mmdet.patch`` applied (``PORT_MMDET_PATCH``).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib
import importlib.util
import inspect
import os
import sys
import types
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "projects.mmdet3d_plugin"
FIX_SCALE = [[0, 0, 0], [0.45, 0, 0], [-0.45, 0, 0], [0, 0.45, 0], [0, -0.45, 0], [0, 0, 0.45], [0, 0, -0.45]]
CONE_REG_WEIGHTS = [2.0, 2.0, 2.0, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0]
RESNET_CHANNELS = {18: [64, 128, 256, 512], 34: [64, 128, 256, 512], 50: [256, 512, 1024, 2048]}
# Keys of params.yaml's `model` section that map onto the reference config (read by `reference_config`), and
# the defaults our build_model uses for those a profile leaves out. Any other key fails the parity tests until
# its meaning for the reference is written here.
MODEL_DEFAULTS: dict[str, Any] = {
    "depth": 50,
    "with_cp": True,
    "embed_dims": 256,
    "num_groups": 8,
    "num_levels": 4,
    "num_cams": 6,
    "num_decoder": 6,
    "num_single_frame_decoder": 1,
    "num_temp_instances": 600,
    "confidence_decay": 0.6,
    "dropout": 0.1,
    "attn_drop": 0.15,
    "num_learnable_pts": 6,
    "num_dn_groups": 5,
    "num_temp_dn_groups": 3,
    "max_dn_gt": 32,
    "num_depth_layers": 3,
    "depth_loss_weight": 0.2,
    "use_grid_mask": True,
    "num_output": 300,
    "classes": None,
    "loss": None,  # None: REFERENCE_LOSS
    "matching": None,  # None: REFERENCE_MATCHING
}
# The reference config's loss and matching weights (sparse4dv3_temporal_r50_1x8_bs6_256x704.py: loss_cls,
# loss_reg, reg_weights, sampler), under the names of params.yaml's model.loss / model.matching;
# tests/test_parity_config.py reads the config file itself and checks these.
REFERENCE_LOSS: dict[str, Any] = {
    "cls_weight": 2.0,
    "focal_gamma": 2.0,
    "focal_alpha": 0.25,
    "box_weight": 0.25,
    "reg_weights": [2.0] * 3 + [1.0] * 7,
    "cls_threshold_to_reg": 0.05,
    # Not in the config: the reference's code (its losses.py, mmdet's binary_cross_entropy) keeps the centerness
    # target's gradient; True is the Ascend port's patch (PORT_MMDET_PATCH), which build_reference applies.
    "detach_centerness_target": False,
}
REFERENCE_MATCHING: dict[str, Any] = {
    "cls_weight": 2.0,
    "box_weight": 0.25,
    "reg_weights": [2.0] * 3 + [0.5] * 3 + [0.0] * 4,
    "cone_reg_weights": CONE_REG_WEIGHTS,
    "dn_noise_scale": [2.0] * 3 + [0.5] * 7,
}
# Our switches away from reference quirks (docs/fidelity.md) and the value that keeps the reference's maths.
REFERENCE_SWITCHES: dict[str, Any] = {"correct_projected_yaw": False, "sort_cls_scores": False}
# The Ascend port of Sparse4D (Ascend/DrivingSDK 9c2fb9ea, model_examples/Sparse4D/mmdet.patch), whose training the
# seed profiles reproduce: its one hunk, in mmdet's binary_cross_entropy (mmdet/models/losses/cross_entropy_loss.py;
# the reference's centerness loss is CrossEntropyLoss with use_sigmoid), detaches the label, so the centerness target
# exp(-|box_target - box|) passes no gradient to the box (our model.loss.detach_centerness_target).
PORT_MMDET_PATCH = (
    "        pred, label.float(), pos_weight=class_weight, reduction='none')",
    "        pred, label.float().detach(), pos_weight=class_weight, reduction='none')",
)


def reference_root() -> Path:
    """Where the reference checkout is expected ($SPARSE4D_REFERENCE, else ../shared/reference/Sparse4D)."""
    env = os.environ.get("SPARSE4D_REFERENCE")
    return Path(env) if env else ROOT.parent / "shared" / "reference" / "Sparse4D"


def require_reference() -> Path:
    """The reference checkout, or skip the calling test with the reason."""
    root = reference_root()
    if not (root / "projects" / "mmdet3d_plugin" / "models" / "sparse4d_head.py").is_file():
        pytest.skip(
            f"reference Sparse4D (HorizonRobotics/Sparse4D c41df4bb) not found at {root}: "
            "put it at ../shared/reference/Sparse4D or set SPARSE4D_REFERENCE"
        )
    return root


def _oracle():
    from tests.kernel_oracle import deformable_aggregation_oracle

    return deformable_aggregation_oracle


def _active_pieces(spatial_shape: torch.Tensor, scale_start_index: torch.Tensor, sampling_location: torch.Tensor):
    """Per (sample, camera): the (anchor, point) pairs that the kernel samples in that camera (normalised x and y
    strictly inside (0, 1); the kernel returns early for the others, which add nothing and get no gradient), and
    the camera's block of feature rows with its level shapes and starts."""
    bs, _, _, num_cams, _ = sampling_location.shape
    sizes = (spatial_shape[..., 0] * spatial_shape[..., 1]).sum(dim=1)
    for b in range(bs):
        for cam in range(num_cams):
            loc = sampling_location[b, :, :, cam]  # (A, P, 2)
            active = ((loc > 0) & (loc < 1)).all(dim=-1)
            anchors, points = torch.nonzero(active, as_tuple=True)
            if len(anchors):
                first = int(scale_start_index[cam, 0])
                rows = slice(first, first + int(sizes[cam]))
                yield (
                    b,
                    cam,
                    anchors,
                    points,
                    rows,
                    spatial_shape[cam : cam + 1],
                    scale_start_index[cam : cam + 1] - first,
                )


def _piece(feat, shape, start, loc, weights):
    """The oracle on one camera's block and K active pairs: (rows, C), (K, 2), (K, L, G) -> (K, C)."""
    return _oracle()(feat[None], shape, start, loc[None, :, None, None], weights[None, :, None, None])[0]


def oracle_forward(mc_ms_feat, spatial_shape, scale_start_index, sampling_location, weights) -> torch.Tensor:
    """The kernel oracle's output, evaluated on the active (point, camera) pairs only (the others add nothing):
    same values as `deformable_aggregation_oracle` up to the order of the sums, and several times faster."""
    bs, num_anchor = sampling_location.shape[:2]
    output = mc_ms_feat.new_zeros((bs, num_anchor, mc_ms_feat.shape[-1]))
    with torch.no_grad():
        for b, cam, anchors, points, rows, shape, start in _active_pieces(
            spatial_shape, scale_start_index, sampling_location
        ):
            piece = _piece(
                mc_ms_feat[b, rows],
                shape,
                start,
                sampling_location[b, anchors, points, cam],
                weights[b, anchors, points, cam],
            )
            output[b].index_add_(0, anchors, piece)
    return output


def oracle_backward(mc_ms_feat, spatial_shape, scale_start_index, sampling_location, weights, grad_output):
    """Gradients of `oracle_forward` by autograd through the oracle, one (sample, camera) piece at a time (the
    whole graph of the transcription would not fit in memory on the full model)."""
    grad_feat, grad_loc, grad_weights = (torch.zeros_like(x) for x in (mc_ms_feat, sampling_location, weights))
    for b, cam, anchors, points, rows, shape, start in _active_pieces(
        spatial_shape, scale_start_index, sampling_location
    ):
        inputs = [
            mc_ms_feat[b, rows].detach().requires_grad_(),
            sampling_location[b, anchors, points, cam].detach().requires_grad_(),
            weights[b, anchors, points, cam].detach().requires_grad_(),
        ]
        with torch.enable_grad():
            piece = _piece(inputs[0], shape, start, inputs[1], inputs[2])
            grads = torch.autograd.grad(piece, inputs, grad_output[b, anchors], allow_unused=True)
        if grads[0] is not None:
            grad_feat[b, rows] += grads[0]
        if grads[1] is not None:
            grad_loc[b, anchors, points, cam] += grads[1]
        if grads[2] is not None:
            grad_weights[b, anchors, points, cam] += grads[2]
    return grad_feat, grad_loc, grad_weights


class OracleAggregation(torch.autograd.Function):
    """The reference op's autograd Function with the oracle inside, keeping the inputs' dtype (the reference's
    casts to float32, which a float64 comparison cannot go through)."""

    @staticmethod
    def forward(ctx, mc_ms_feat, spatial_shape, scale_start_index, sampling_location, weights):
        ctx.save_for_backward(mc_ms_feat, spatial_shape, scale_start_index, sampling_location, weights)
        return oracle_forward(mc_ms_feat, spatial_shape, scale_start_index, sampling_location, weights)

    @staticmethod
    def backward(ctx, grad_output):
        mc_ms_feat, spatial_shape, scale_start_index, sampling_location, weights = ctx.saved_tensors
        grads = oracle_backward(mc_ms_feat, spatial_shape, scale_start_index, sampling_location, weights, grad_output)
        return grads[0], None, None, grads[1], grads[2]


def _compiled_op() -> types.ModuleType | None:
    """The reference's op as built from its sources (top-level `deformable_aggregation_ext`), if importable."""
    try:
        return importlib.import_module("deformable_aggregation_ext")
    except ImportError:
        return None


def _extension_stand_in(name: str) -> types.ModuleType:
    """`deformable_aggregation_ext` with the compiled functions' signatures: on CUDA tensors the compiled op when it
    was built (benchmarks/device_check.sh builds it), otherwise the kernel oracle."""
    module = types.ModuleType(name)
    module.__doc__ = "Stand-in for the unbuilt op: tests/kernel_oracle.py computes it (tests/reference.py)."

    def forward(mc_ms_feat, spatial_shape, scale_start_index, sampling_location, weights):
        compiled = _compiled_op() if mc_ms_feat.is_cuda else None
        if compiled is not None:
            return compiled.deformable_aggregation_forward(
                mc_ms_feat, spatial_shape, scale_start_index, sampling_location, weights
            )
        return oracle_forward(mc_ms_feat, spatial_shape, scale_start_index, sampling_location, weights)

    def backward(
        mc_ms_feat,
        spatial_shape,
        scale_start_index,
        sampling_location,
        weights,
        grad_output,
        grad_mc_ms_feat,
        grad_sampling_location,
        grad_weights,
    ):
        compiled = _compiled_op() if mc_ms_feat.is_cuda else None
        if compiled is not None:
            compiled.deformable_aggregation_backward(
                mc_ms_feat,
                spatial_shape,
                scale_start_index,
                sampling_location,
                weights,
                grad_output,
                grad_mc_ms_feat,
                grad_sampling_location,
                grad_weights,
            )
            return
        grads = oracle_backward(mc_ms_feat, spatial_shape, scale_start_index, sampling_location, weights, grad_output)
        for buffer, grad in zip((grad_mc_ms_feat, grad_sampling_location, grad_weights), grads):
            buffer.add_(grad)

    module.deformable_aggregation_forward = forward
    module.deformable_aggregation_backward = backward
    return module


@functools.cache
def _import_reference(root: str) -> types.SimpleNamespace:
    """Import the reference's model code once (mmdet registries are global, so it is cached)."""
    # Only the model and op packages: the parents are registered as bare packages over the checkout's folders.
    for name, folder in (("projects", "projects"), (PACKAGE, "projects/mmdet3d_plugin")):
        existing = sys.modules.get(name)
        if existing is not None:
            if list(getattr(existing, "__path__", [])) != [str(Path(root) / folder)]:
                raise RuntimeError(f"a module '{name}' not from {root} is already imported: {existing}")
            continue
        package = types.ModuleType(name)
        package.__path__ = [str(Path(root) / folder)]
        sys.modules[name] = package
    ext = f"{PACKAGE}.ops.deformable_aggregation_ext"
    sys.modules.setdefault(ext, _extension_stand_in(ext))
    ipython_stub = None
    if importlib.util.find_spec("IPython") is None:  # imported by the reference for debugging only
        ipython_stub = sys.modules.setdefault("IPython", types.ModuleType("IPython"))
        ipython_stub.embed = lambda *args, **kwargs: None
    try:
        models = importlib.import_module(f"{PACKAGE}.models")
        ops = importlib.import_module(f"{PACKAGE}.ops")
        blocks = importlib.import_module(f"{PACKAGE}.models.blocks")
        focal = importlib.import_module("mmdet.models.losses.focal_loss")
    finally:
        if ipython_stub is not None and sys.modules.get("IPython") is ipython_stub:
            del sys.modules["IPython"]
    if blocks.DAF is None:
        raise RuntimeError(f"{root}: the reference's deformable aggregation op path did not import")
    return types.SimpleNamespace(models=models, ops=ops, blocks=blocks, focal=focal)


def reference_modules() -> types.SimpleNamespace:
    return _import_reference(str(require_reference()))


def model_params(profile: str) -> dict:
    """The `model` section of params.yaml ("demo") or params-full.yaml ("full")."""
    import yaml

    path = ROOT / {"demo": "params.yaml", "full": "params-full.yaml"}[profile]
    return dict(yaml.safe_load(path.read_text())["model"])


def reference_params(params: dict) -> dict:
    """`params` with every switch away from a reference quirk at the reference's value."""
    return {**params, **{k: v for k, v in REFERENCE_SWITCHES.items() if k in params}}


def reference_config(params: dict, anchor: np.ndarray, use_deformable_func: bool = True) -> dict:
    """The reference config (projects/configs/sparse4dv3_temporal_r50_1x8_bs6_256x704.py, its `model` dict) with
    the sizes of one of our profiles (params.yaml's `model` section)."""
    unknown = sorted(set(params) - set(MODEL_DEFAULTS) - set(REFERENCE_SWITCHES))
    if unknown:
        raise KeyError(f"model parameters {unknown} have no mapping onto the reference config in tests/reference.py")
    switched = {k: params[k] for k in REFERENCE_SWITCHES if k in params and params[k] != REFERENCE_SWITCHES[k]}
    if switched:
        raise ValueError(f"model parameters {switched} turn off reference behaviour: no reference config matches")
    p = {**MODEL_DEFAULTS, **params}
    from pipeline.settings import CLASSES

    loss = {**REFERENCE_LOSS, **(p["loss"] or {})}
    matching = {**REFERENCE_MATCHING, **(p["matching"] or {})}

    classes = list(p["classes"] or CLASSES)
    embed_dims, num_groups, num_levels = int(p["embed_dims"]), int(p["num_groups"]), int(p["num_levels"])
    num_decoder, num_single = int(p["num_decoder"]), int(p["num_single_frame_decoder"])
    temporal = int(p["num_temp_instances"]) > 0
    dropout = float(p["dropout"])
    attention = dict(
        type="MultiheadAttention", embed_dims=embed_dims * 2, num_heads=num_groups, batch_first=True, dropout=dropout
    )
    single = ["gnn", "norm", "deformable", "ffn", "norm", "refine"]
    multi = (["temp_gnn"] if temporal else []) + single
    head = dict(
        type="Sparse4DHead",
        cls_threshold_to_reg=float(loss["cls_threshold_to_reg"]),
        decouple_attn=True,
        instance_bank=dict(
            type="InstanceBank",
            num_anchor=len(anchor),
            embed_dims=embed_dims,
            anchor=np.asarray(anchor, np.float32),
            anchor_handler=dict(type="SparseBox3DKeyPointsGenerator"),
            num_temp_instances=int(p["num_temp_instances"]) if temporal else -1,
            confidence_decay=float(p["confidence_decay"]),
            feat_grad=False,
        ),
        anchor_encoder=dict(
            type="SparseBox3DEncoder",
            vel_dims=3,
            embed_dims=[embed_dims // 2, embed_dims // 8, embed_dims // 8, embed_dims // 4],
            mode="cat",
            output_fc=False,
            in_loops=1,
            out_loops=4,
        ),
        num_single_frame_decoder=num_single,
        operation_order=(single * num_single + multi * (num_decoder - num_single))[2:],
        temp_graph_model=dict(attention) if temporal else None,
        graph_model=dict(attention),
        norm_layer=dict(type="LN", normalized_shape=embed_dims),
        ffn=dict(
            type="AsymmetricFFN",
            in_channels=embed_dims * 2,
            pre_norm=dict(type="LN"),
            embed_dims=embed_dims,
            feedforward_channels=embed_dims * 4,
            num_fcs=2,
            ffn_drop=dropout,
            act_cfg=dict(type="ReLU", inplace=True),
        ),
        deformable_model=dict(
            type="DeformableFeatureAggregation",
            embed_dims=embed_dims,
            num_groups=num_groups,
            num_levels=num_levels,
            num_cams=int(p["num_cams"]),
            attn_drop=float(p["attn_drop"]),
            use_deformable_func=use_deformable_func,
            use_camera_embed=True,
            residual_mode="cat",
            kps_generator=dict(
                type="SparseBox3DKeyPointsGenerator", num_learnable_pts=int(p["num_learnable_pts"]), fix_scale=FIX_SCALE
            ),
        ),
        refine_layer=dict(
            type="SparseBox3DRefinementModule",
            embed_dims=embed_dims,
            num_cls=len(classes),
            refine_yaw=True,
            with_quality_estimation=True,
        ),
        sampler=dict(
            type="SparseBox3DTarget",
            num_dn_groups=int(p["num_dn_groups"]),
            num_temp_dn_groups=int(p["num_temp_dn_groups"]),
            dn_noise_scale=list(matching["dn_noise_scale"]),
            max_dn_gt=int(p["max_dn_gt"]),
            add_neg_dn=True,
            cls_weight=float(matching["cls_weight"]),
            box_weight=float(matching["box_weight"]),
            reg_weights=list(matching["reg_weights"]),
            cls_wise_reg_weights={classes.index("traffic_cone"): list(matching["cone_reg_weights"])}
            if "traffic_cone" in classes
            else None,
        ),
        loss_cls=dict(
            type="FocalLoss",
            use_sigmoid=True,
            gamma=float(loss["focal_gamma"]),
            alpha=float(loss["focal_alpha"]),
            loss_weight=float(loss["cls_weight"]),
        ),
        loss_reg=dict(
            type="SparseBox3DLoss",
            loss_box=dict(type="L1Loss", loss_weight=float(loss["box_weight"])),
            loss_centerness=dict(type="CrossEntropyLoss", use_sigmoid=True),
            loss_yawness=dict(type="GaussianFocalLoss"),
            cls_allow_reverse=[classes.index("barrier")] if "barrier" in classes else None,
        ),
        decoder=dict(type="SparseBox3DDecoder", num_output=int(p["num_output"])),
        reg_weights=list(loss["reg_weights"]),
    )
    depth = int(p["depth"])
    num_depth_layers = int(p["num_depth_layers"])
    return dict(
        type="Sparse4D",
        use_grid_mask=bool(p["use_grid_mask"]),
        use_deformable_func=use_deformable_func,
        img_backbone=dict(
            type="ResNet",
            depth=depth,
            num_stages=4,
            frozen_stages=-1,
            norm_eval=False,
            style="pytorch",
            with_cp=bool(p["with_cp"]),
            out_indices=tuple(range(num_levels)),
            norm_cfg=dict(type="BN", requires_grad=True),
        ),
        img_neck=dict(
            type="FPN",
            num_outs=num_levels,
            start_level=0,
            out_channels=embed_dims,
            add_extra_convs="on_output",
            relu_before_extra_convs=True,
            in_channels=RESNET_CHANNELS[depth][:num_levels],
        ),
        depth_branch=dict(
            type="DenseDepthNet",
            embed_dims=embed_dims,
            num_depth_layers=num_depth_layers,
            loss_weight=float(p["depth_loss_weight"]),
        )
        if num_depth_layers > 0
        else None,
        head=head,
    )


def build_reference(params: dict, anchor: np.ndarray, use_deformable_func: bool = True) -> torch.nn.Module:
    """The reference detector, built through mmdet's registry as its training script does."""
    modules = reference_modules()
    from mmdet.models import build_detector

    model = build_detector(reference_config(params, anchor, use_deformable_func))
    loss_cls = model.head.loss_cls
    loss_cls.forward = types.MethodType(_focal_loss_with_negative_targets(modules.focal), loss_cls)
    if {**REFERENCE_LOSS, **(params.get("loss") or {})}["detach_centerness_target"]:
        # The Ascend port's training: its mmdet.patch, on the criterion of the centerness loss (the one
        # CrossEntropyLoss of the reference's config, so this is where the port's patch of mmdet acts).
        loss_cns = model.head.loss_reg.loss_cns
        original = importlib.import_module("mmdet.models.losses.cross_entropy_loss").binary_cross_entropy
        if loss_cns.cls_criterion is not original:
            raise RuntimeError(f"the reference's centerness loss is not mmdet's binary_cross_entropy: {loss_cns}")
        loss_cns.cls_criterion = ported_binary_cross_entropy()
    return model


@functools.cache
def ported_binary_cross_entropy():
    """mmdet's `binary_cross_entropy` with the Ascend port's mmdet.patch applied (PORT_MMDET_PATCH): the installed
    mmdet's own source with that line replaced, compiled in a copy of its module's namespace."""
    module = importlib.import_module("mmdet.models.losses.cross_entropy_loss")
    source = inspect.getsource(module.binary_cross_entropy)
    before, after = PORT_MMDET_PATCH
    if source.count(before) != 1:
        raise RuntimeError(f"the port's mmdet.patch does not apply to {module.__file__}: no line {before.strip()!r}")
    namespace = dict(vars(module))
    exec(compile(source.replace(before, after), module.__file__, "exec"), namespace)
    return namespace["binary_cross_entropy"]


def _focal_loss_with_negative_targets(focal_module: types.ModuleType):
    """mmdet FocalLoss.forward as mmcv's CUDA op evaluates it: a target outside [0, num_classes) is a negative
    for every class. On a CPU mmdet's own code runs on the mapped targets; on CUDA the same python expression
    (`py_sigmoid_focal_loss`) stands in for mmcv's compiled op, which computes it."""
    original = focal_module.FocalLoss.forward

    def forward(self, pred, target, weight=None, avg_factor=None, reduction_override=None):
        num_classes = pred.shape[-1]
        target = torch.where((target < 0) | (target > num_classes), target.new_tensor(num_classes), target)
        if not pred.is_cuda:
            return original(self, pred, target, weight, avg_factor, reduction_override)
        one_hot = torch.nn.functional.one_hot(target, num_classes + 1)[:, :num_classes]
        reduction = reduction_override or self.reduction
        return self.loss_weight * focal_module.py_sigmoid_focal_loss(
            pred, one_hot, weight, gamma=self.gamma, alpha=self.alpha, reduction=reduction, avg_factor=avg_factor
        )

    return forward


@contextlib.contextmanager
def running_reference(device: torch.device, float64_op: bool = False) -> Iterator[None]:
    """While the reference runs: its `.cuda()` calls are no-ops on a CPU, and in float64 its op path (whose
    autograd Function casts to float32) is the oracle directly."""
    blocks = reference_modules().blocks
    saved_cuda, saved_daf = torch.Tensor.cuda, blocks.DAF
    if device.type != "cuda":
        torch.Tensor.cuda = lambda self, *args, **kwargs: self
    if float64_op:
        blocks.DAF = OracleAggregation.apply
    try:
        yield
    finally:
        torch.Tensor.cuda = saved_cuda
        blocks.DAF = saved_daf


def realistic_anchor(num_anchor: int, seed: int = 0) -> np.ndarray:
    """(num_anchor, 11) anchors as the k-means stage writes them, but with random yaw: centres in +-50 m (denser
    near the ego), log sizes of cars to buses, (sin, cos) of a random yaw, zero velocity."""
    rng = np.random.default_rng(seed)
    anchor = np.zeros((num_anchor, 11), np.float32)
    radius = 50 * np.sqrt(rng.uniform(0.01, 1, num_anchor))
    angle = rng.uniform(-np.pi, np.pi, num_anchor)
    anchor[:, 0], anchor[:, 1] = radius * np.cos(angle), radius * np.sin(angle)
    anchor[:, 2] = rng.normal(-1.0, 0.5, num_anchor)
    anchor[:, 3:6] = np.log(rng.uniform([0.5, 0.5, 0.8], [3.0, 11.0, 3.5], (num_anchor, 3)))
    yaw = rng.uniform(-np.pi, np.pi, num_anchor)
    anchor[:, 6], anchor[:, 7] = np.sin(yaw), np.cos(yaw)
    return anchor


@torch.no_grad()
def perturb_weights(model: torch.nn.Module, seed: int = 0) -> list[str]:
    """Make every constant-initialised tensor non-trivial, with a seeded generator: BatchNorm statistics and
    affine, LayerNorm affine, zero biases, the zero `weights_fc`, the refinement `Scale`s, the class bias, the
    instance bank's (zero, frozen) instance features. Returns the names changed."""
    gen = torch.Generator().manual_seed(seed)
    class_biases = {  # the last layer of every classification branch
        f"{name}.{len(module) - 1}.bias" for name, module in model.named_modules() if name.endswith("cls_layers")
    }
    changed = []
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if not tensor.is_floating_point() or name.endswith("fix_scale") or name.endswith("instance_bank.anchor"):
            continue
        flat = tensor.reshape(-1)
        if not bool((flat == flat[0]).all()):
            continue
        noise = torch.randn(tensor.shape, generator=gen, dtype=tensor.dtype)
        if name.endswith("running_var"):
            tensor.copy_(0.5 + torch.rand(tensor.shape, generator=gen, dtype=tensor.dtype))
        elif name in class_biases:  # the prior 0.01, spread: some queries above the tracking threshold 0.2
            tensor.add_(noise)
        elif name.endswith("weights_fc.weight"):
            tensor.copy_(0.1 * noise)
        else:
            tensor.add_(0.1 * noise)
        changed.append(name)
    return changed


def copy_state(ours: torch.nn.Module, reference: torch.nn.Module) -> None:
    """Load our state dict into the reference strictly, after a readable check of names and shapes."""
    mine, theirs = ours.state_dict(), reference.state_dict()
    missing, unexpected = sorted(set(theirs) - set(mine)), sorted(set(mine) - set(theirs))
    shapes = [(k, tuple(mine[k].shape), tuple(theirs[k].shape)) for k in mine.keys() & theirs.keys()]
    shapes = [s for s in shapes if s[1] != s[2]]
    if missing or unexpected or shapes:
        raise AssertionError(
            f"state dicts differ: reference-only {missing[:10]}, ours-only {unexpected[:10]}, shapes {shapes[:10]}"
        )
    reference.load_state_dict(mine, strict=True)


# --------------------------------------------------------------------------- inputs: one scene, moving ego


def _pose(x: float, y: float, yaw: float) -> np.ndarray:
    pose = np.eye(4)
    pose[:2, :2] = [[np.cos(yaw), -np.sin(yaw)], [np.sin(yaw), np.cos(yaw)]]
    pose[:2, 3] = x, y
    pose[2, 3] = 1.8
    return pose


def _projection(width: int, height: int, num_cams: int, jitter: float) -> np.ndarray:
    """(num_cams, 4, 4) LiDAR -> pixel matrices of cameras around the car, 70 degrees wide."""
    focal = width / 2 / np.tan(np.radians(35))
    intrinsic = np.array([[focal, 0, width / 2, 0], [0, focal, height / 2, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    mats = []
    for c in range(num_cams):
        yaw = c * 2 * np.pi / num_cams + jitter
        # camera axes: x right, y down, z forward (along yaw) in the LiDAR frame
        forward = np.array([np.cos(yaw), np.sin(yaw), 0.0])
        right = np.array([np.sin(yaw), -np.cos(yaw), 0.0])
        rotation = np.stack([right, [0.0, 0.0, -1.0], forward])
        lidar2cam = np.eye(4)
        lidar2cam[:3, :3] = rotation
        lidar2cam[:3, 3] = -rotation @ np.array([0.5 * np.cos(yaw), 0.5 * np.sin(yaw), 0.3])
        mats.append(intrinsic @ lidar2cam)
    return np.stack(mats)


def make_scene(
    num_frames: int,
    bs: int,
    height: int,
    width: int,
    num_cams: int = 6,
    num_depth_layers: int = 3,
    targets: bool = False,
    seed: int = 0,
) -> list[dict]:
    """Frames of one scene per batch element, in the data pipeline's format (float32 tensors): the ego drives
    (sample 0 straight and fast, sample 1 turning, at 2 Hz and 2.2 Hz), objects move with their own velocity and
    leave and enter the frame list; with `targets`, ground truth, instance ids, dense depth and focal too."""
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    ego_speed = [(8.0, 0.0), (4.0, 0.25)]  # m/s, rad/s
    intervals = [0.5, 0.45]
    start = 1533151603.547590
    num_objects = [13, 8]
    objects = []
    for b in range(bs):
        n = num_objects[b % 2]
        objects.append(
            dict(
                centre=np.c_[rng.uniform(-35, 35, (n, 2)), rng.normal(-0.5, 0.3, n)],
                size=rng.uniform([0.5, 0.5, 0.8], [2.5, 10.0, 3.5], (n, 3)),
                yaw=rng.uniform(-np.pi, np.pi, n),
                velocity=rng.normal(0, 3, (n, 2)) * (rng.uniform(size=(n, 1)) < 0.6),
                label=rng.integers(0, 10, n),
                instance=rng.choice(1000, n, replace=False),
            )
        )
    projection = [_projection(width, height, num_cams, jitter=0.05 * b) for b in range(bs)]
    frames = []
    for k in range(num_frames):
        poses, metas, labels, boxes = [], [], [], []
        timestamps = [start + 7.0 * b + intervals[b % 2] * k for b in range(bs)]
        for b in range(bs):
            speed, turn = ego_speed[b % 2]
            t = intervals[b % 2] * k
            yaw = turn * t
            pose = _pose(speed * t * np.cos(yaw / 2), speed * t * np.sin(yaw / 2), yaw)
            poses.append(pose)
            meta = dict(T_global=pose, T_global_inv=np.linalg.inv(pose), timestamp=timestamps[b])
            if targets:
                obj = objects[b]
                present = np.flatnonzero((np.arange(len(obj["yaw"])) + k) % 5 != 0)
                present = rng.permutation(present)
                centre = obj["centre"][present].copy()
                centre[:, :2] += obj["velocity"][present] * t
                local = (meta["T_global_inv"] @ np.c_[centre, np.ones(len(present))].T).T[:, :3]
                velocity = obj["velocity"][present] @ pose[:2, :2]  # global -> LiDAR rotation
                box = np.c_[local, obj["size"][present], obj["yaw"][present] - yaw, velocity]
                boxes.append(torch.tensor(box, dtype=torch.float32))
                labels.append(torch.tensor(obj["label"][present], dtype=torch.int64))
                meta["instance_id"] = obj["instance"][present].astype(np.int64)
            metas.append(meta)
        frame = dict(
            img=torch.randn((bs, num_cams, 3, height, width), generator=gen),
            projection_mat=torch.tensor(np.stack(projection), dtype=torch.float32),
            image_wh=torch.tensor([[width, height]], dtype=torch.float32).repeat(bs, num_cams, 1),
            timestamp=torch.tensor(timestamps, dtype=torch.float64),
            img_metas=metas,
        )
        if targets:
            frame["gt_labels_3d"] = labels
            frame["gt_bboxes_3d"] = boxes
            frame["focal"] = torch.tensor(np.stack(projection)[:, :, 0, 0], dtype=torch.float32)
            depths = []
            for stride in (4, 8, 16)[:num_depth_layers]:
                shape = (bs * num_cams, height // stride, width // stride)
                depth = torch.rand(shape, generator=gen) * 60
                depths.append(torch.where(torch.rand(shape, generator=gen) < 0.3, depth, torch.zeros(())))
            frame["gt_depth"] = depths
        frames.append(frame)
    return frames


def to(data: Any, device: torch.device, dtype: torch.dtype | None = None) -> Any:
    """A deep copy of a frame with its tensors on `device` (floating ones in `dtype`, timestamps kept)."""

    def convert(x: Any, key: str = "") -> Any:
        if isinstance(x, torch.Tensor):
            if dtype is not None and x.is_floating_point() and key != "timestamp":
                x = x.to(dtype)
            return x.to(device)
        if isinstance(x, dict):
            return {k: convert(v, k) for k, v in x.items()}
        if isinstance(x, list):
            return [convert(v, key) for v in x]
        return copy.deepcopy(x)

    return convert(data)
