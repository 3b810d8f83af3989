"""Sparse4Dv3 on a tiny configuration: training and inference paths, temporal behaviour,
denoising targets, decoder outputs, and checkpoint compatibility with the reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from model import build_model
from model.head import operation_order
from model.target import NEGATIVE_QUERY
from tests.conftest import model_settings

# the demo profile's model, smaller (grid mask on, as the reference trains)
TINY = model_settings(
    depth=18,
    embed_dims=64,
    num_groups=4,
    num_decoder=3,
    num_temp_instances=20,
    num_dn_groups=2,
    num_temp_dn_groups=1,
    max_dn_gt=8,
    with_cp=False,
    use_grid_mask=True,
)
REFERENCE_NAMES = Path(__file__).parent / "data" / "sparse4dv3_r50_state_dict.tsv"


def tiny_anchor(n: int = 40) -> np.ndarray:
    rng = np.random.default_rng(0)
    anchor = np.zeros((n, 11), np.float32)
    anchor[:, :2] = rng.uniform(-30, 30, (n, 2))
    anchor[:, 3:6] = np.log([2.0, 4.5, 1.6])
    anchor[:, 7] = 1.0
    return anchor


def make_batch(bs: int = 2, t: float = 0.0, height: int = 64, width: int = 176, num_gt: int = 5, seed: int = 0) -> dict:
    """A batch in the data pipeline's format: 6 cameras looking around a LiDAR at the origin."""
    rng = np.random.default_rng(seed)
    intrinsic = np.array([[100, 0, width / 2, 0], [0, 100, height / 2, 0], [0, 0, 1, 0], [0, 0, 0, 1]], np.float32)
    mats = []
    for c in range(6):
        yaw = c * np.pi / 3
        lidar2cam = np.eye(4, dtype=np.float32)
        lidar2cam[:3, :3] = [[np.sin(yaw), -np.cos(yaw), 0], [0, 0, -1], [np.cos(yaw), np.sin(yaw), 0]]
        mats.append(intrinsic @ lidar2cam)
    boxes = [
        torch.tensor(
            np.c_[
                rng.uniform(-20, 20, (num_gt, 2)),
                np.zeros(num_gt),
                np.tile([2.0, 4.5, 1.6], (num_gt, 1)),
                rng.uniform(-3, 3, num_gt),
                rng.normal(0, 2, (num_gt, 2)),
            ],
            dtype=torch.float32,
        )
        for _ in range(bs)
    ]
    return dict(
        img=torch.randn(bs, 6, 3, height, width),
        projection_mat=torch.tensor(np.stack(mats))[None].repeat(bs, 1, 1, 1),
        image_wh=torch.tensor([[width, height]], dtype=torch.float32).repeat(bs, 6, 1),
        timestamp=torch.full((bs,), t, dtype=torch.float64),
        focal=torch.full((bs, 6), 100.0),
        img_metas=[dict(T_global=np.eye(4), T_global_inv=np.eye(4), instance_id=np.arange(num_gt)) for _ in range(bs)],
        gt_labels_3d=[torch.tensor(rng.integers(0, 10, num_gt)) for _ in range(bs)],
        gt_bboxes_3d=boxes,
        gt_depth=[torch.rand(bs * 6, height // s, width // s) * 50 for s in (4, 8, 16)],
    )


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    np.random.seed(0)
    return build_model(TINY, tiny_anchor())


def test_training_step_has_every_loss_and_finite_gradients(tiny):
    tiny.train()
    losses = tiny(make_batch())
    # per decoder: class, box, centerness, yawness; per decoder on denoising queries: class, box
    assert len(losses) == 3 * 4 + 3 * 2 + 1 and "loss_dense_depth" in losses
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    grads = {n: p.grad for n, p in tiny.named_parameters() if p.requires_grad}
    assert all(
        g is not None and torch.isfinite(g).all() for n, g in grads.items() if "instance_bank.instance_feature" not in n
    )
    assert (
        grads["img_backbone.conv1.weight"].abs().sum() > 0 and grads["head.layers.0.weights_fc.weight"].abs().sum() > 0
    )


def test_temporal_path_carries_instances_and_resets_on_a_scene_change(tiny):
    tiny.eval()
    bank = tiny.head.instance_bank
    tiny(make_batch(t=0.0))
    assert bank.cached_anchor.shape == (2, 20, 11)
    tiny(make_batch(t=0.5, seed=1))
    assert bank.mask.all()  # the next frame of a sequence uses the cached instances
    first_ids = bank.instance_id.clone()
    tiny(make_batch(t=100.0, seed=2))  # a new scene: far in time
    assert not bank.mask.any()
    assert first_ids.shape == bank.instance_id.shape
    tiny(make_batch(bs=1, t=100.5))  # another batch size also starts afresh
    assert bank.cached_anchor.shape[0] == 1


def test_training_over_three_frames_uses_temporal_denoising(tiny):
    tiny.train()
    for t in (0.0, 0.5, 1.0):
        losses = tiny(make_batch(t=t))
        sum(losses.values()).backward()
        assert all(torch.isfinite(v) for v in losses.values())
    dn = tiny.head.target_assigner.dn_metas
    assert dn["dn_anchor"].shape[:2] == (2, 1)  # (bs, num_temp_dn_groups)
    assert dn["dn_id_target"].shape == dn["valid_mask"].shape


def test_denoising_targets(tiny):
    assigner = tiny.head.target_assigner
    batch = make_batch(num_gt=5)
    ids = [torch.arange(5), torch.arange(5)]
    dn_anchor, dn_box, dn_cls, attn_mask, valid, dn_ids = assigner.get_dn_anchors(
        batch["gt_labels_3d"], batch["gt_bboxes_3d"], ids
    )
    groups, per_group = 2, 5 * 2  # positives and negatives
    assert dn_anchor.shape == (2, groups * per_group, 10) and dn_box.shape == dn_anchor.shape
    assert dn_cls.shape == valid.shape == dn_ids.shape == (2, groups * per_group)
    assert attn_mask.shape == (groups * per_group,) * 2
    assert not attn_mask[:per_group, :per_group].any() and attn_mask[:per_group, per_group:].all()
    # every ground truth box gets exactly one positive query per group; the rest are negatives
    for g in range(groups):
        cls = dn_cls[0, g * per_group : (g + 1) * per_group]
        assert (cls >= 0).sum() == 5 and (cls == NEGATIVE_QUERY).sum() == 5
    assert valid.all()


def test_decoder_outputs(tiny):
    tiny.eval()
    out = tiny(make_batch(bs=1))[0]
    boxes, scores, labels = out["boxes_3d"], out["scores_3d"], out["labels_3d"]
    assert boxes.shape == (40, 10)  # top-k capped by the number of (instance, class) pairs in tracking mode
    assert ((scores >= 0) & (scores <= 1)).all() and (scores[:-1] >= scores[1:]).all()
    assert ((labels >= 0) & (labels < 10)).all()
    assert (boxes[:, 3:6] > 0).all() and (boxes[:, 6].abs() <= np.pi).all()
    assert "instance_ids" in out


def reference_shapes() -> dict[str, tuple[int, ...]]:
    shapes = {}
    for line in REFERENCE_NAMES.read_text().splitlines():
        if line.startswith("#"):
            continue
        name, shape = line.split("\t")
        shapes[name] = () if shape == "scalar" else tuple(int(x) for x in shape.split("x"))
    return shapes


def test_full_config_state_dict_is_the_reference_one(tmp_path):
    net = build_model(model_settings("params-full.yaml"), np.zeros((900, 11), np.float32))
    ours = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    ref = reference_shapes()
    assert len(ref) == 819
    assert ours == ref
    # A checkpoint in the reference layout loads strictly (as the released sparse4dv3_r50.pth).
    ckpt = tmp_path / "sparse4dv3.pth"
    torch.save({"state_dict": {k: torch.zeros(s) for k, s in ref.items()}}, ckpt)
    state = torch.load(ckpt)["state_dict"]
    build_model(model_settings("params-full.yaml"), np.zeros((900, 11), np.float32)).load_state_dict(state, strict=True)


def test_operation_order_is_the_reference_one():
    order = operation_order(6, 1, temporal=True)
    assert order[:4] == ["deformable", "ffn", "norm", "refine"]
    assert order[4:11] == ["temp_gnn", "gnn", "norm", "deformable", "ffn", "norm", "refine"]
    assert len(order) == 4 + 7 * 5


def test_backbone_checkpoint_consumes_every_key(tiny, tmp_path):
    torchvision = pytest.importorskip("torchvision")
    weights = torchvision.models.resnet18(weights=None).state_dict()
    path = tmp_path / "resnet18.pth"
    torch.save(weights, path)
    ignored = tiny.load_backbone_weights(path)
    assert ignored == ["fc.bias", "fc.weight"]
    assert torch.equal(tiny.img_backbone.conv1.weight, weights["conv1.weight"])
    weights["layer9.weight"] = torch.zeros(1)
    torch.save(weights, path)
    with pytest.raises(ValueError, match="layer9.weight"):
        tiny.load_backbone_weights(path)


def test_mixed_precision_runs_only_the_image_features_in_half(tiny):
    """As the reference's auto_fp16 on extract_feat (out_fp32) and force_fp32 elsewhere: under
    bf16 the backbone and neck compute in bf16, every head module and the losses see fp32."""
    tiny.set_mixed_precision(torch.bfloat16)
    seen: dict[str, set] = {"backbone": set(), "head": set()}

    def record(part):
        def hook(module, inputs, output):
            outs = output if isinstance(output, (tuple, list)) else (output,)
            seen[part].update(str(t.dtype) for t in outs if isinstance(t, torch.Tensor))

        return hook

    handles = [
        m.register_forward_hook(record("backbone"))
        for m in tiny.img_backbone.modules()
        if isinstance(m, torch.nn.Conv2d)
    ]
    handles += [m.register_forward_hook(record("head")) for m in tiny.head.layers]
    handles.append(tiny.head.anchor_encoder.register_forward_hook(record("head")))
    try:
        tiny.train()
        losses = tiny(make_batch())
    finally:
        for h in handles:
            h.remove()
    assert seen["backbone"] == {"torch.bfloat16"}
    assert seen["head"] == {"torch.float32"}
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in tiny.parameters())
