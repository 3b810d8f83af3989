"""The loss and matching weights (params.yaml model.loss / model.matching) against the reference's config file.

Every profile keeps the reference's values (sparse4dv3_temporal_r50_1x8_bs6_256x704.py, read with mmcv's
Config as the reference's tools do), but for model.loss.detach_centerness_target, which the seed profiles take from
the Ascend port (its mmdet.patch); and a changed value reaches the model that training builds.
"""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from model.detector import build_model
from pipeline.settings import CLASSES
from tests.conftest import model_settings
from tests.reference import PORT_MMDET_PATCH, REFERENCE_LOSS, REFERENCE_MATCHING, ROOT, require_reference

CONFIG = "projects/configs/sparse4dv3_temporal_r50_1x8_bs6_256x704.py"
PROFILES = ("params.yaml", "params-full.yaml", "params-performance.yaml")
# The seed profiles reproduce the Ascend port's training, which detaches the centerness target (its mmdet.patch);
# the demo keeps the reference's maths.
DETACH_CENTERNESS_TARGET = {"params.yaml": False, "params-full.yaml": True, "params-performance.yaml": True}


@pytest.fixture(scope="module")
def reference_head() -> dict:
    from mmcv import Config

    return Config.fromfile(str(require_reference() / CONFIG)).model.head


def as_params(head) -> tuple[dict, dict]:
    """The reference head config under our parameter names."""
    sampler = head.sampler
    cone = sampler.cls_wise_reg_weights[CLASSES.index("traffic_cone")]
    loss = {
        "cls_weight": head.loss_cls.loss_weight,
        "focal_gamma": head.loss_cls.gamma,
        "focal_alpha": head.loss_cls.alpha,
        "box_weight": head.loss_reg.loss_box.loss_weight,
        "reg_weights": list(head.reg_weights),
        "cls_threshold_to_reg": head.cls_threshold_to_reg,
        # No switch in the config: its code keeps the target's gradient (the next test checks that code).
        "detach_centerness_target": False,
    }
    matching = {
        "cls_weight": sampler.cls_weight,
        "box_weight": sampler.box_weight,
        "reg_weights": list(sampler.reg_weights),
        "cone_reg_weights": list(cone),
        "dn_noise_scale": list(sampler.dn_noise_scale),
    }
    return loss, matching


def test_the_parity_harness_uses_the_reference_config_values(reference_head):
    assert as_params(reference_head) == (REFERENCE_LOSS, REFERENCE_MATCHING)


def test_the_reference_keeps_the_centerness_target_gradient_and_the_port_detaches_it(reference_head):
    """The reference's centerness loss is mmdet's sigmoid CrossEntropyLoss on exp(-|box_target - box|), with no
    detach in its losses.py nor in the installed mmdet; the port's mmdet.patch line applies to that mmdet."""
    import inspect

    from mmdet.models.losses import cross_entropy_loss

    assert dict(reference_head.loss_reg.loss_centerness) == {"type": "CrossEntropyLoss", "use_sigmoid": True}
    losses = (require_reference() / "projects/mmdet3d_plugin/models/detection3d/losses.py").read_text()
    assert "cns_target = torch.exp(-cns_target)" in losses and "detach" not in losses
    source = inspect.getsource(cross_entropy_loss.binary_cross_entropy)
    assert source.count(PORT_MMDET_PATCH[0]) == 1 and "detach" not in source


@pytest.mark.parametrize("profile", PROFILES)
def test_every_profile_keeps_the_reference_loss_and_matching(reference_head, profile):
    """All but the centerness detach, which the seed profiles take from the port (DETACH_CENTERNESS_TARGET)."""
    model = yaml.safe_load((ROOT / profile).read_text())["model"]
    loss, matching = as_params(reference_head)
    loss["detach_centerness_target"] = DETACH_CENTERNESS_TARGET[profile]
    assert (model["loss"], model["matching"]) == (loss, matching)


def test_a_changed_weight_reaches_the_built_model():
    anchor = np.zeros((8, 11), np.float32)
    small = model_settings(
        depth=18, embed_dims=32, num_groups=2, num_decoder=2, num_temp_instances=4, num_depth_layers=0
    )
    default = build_model(small, anchor).head
    assert default.loss_cls.loss_weight == REFERENCE_LOSS["cls_weight"]
    assert default.target_assigner.reg_weights == REFERENCE_MATCHING["reg_weights"]
    assert default.loss_reg.detach_centerness_target is False
    changed = dict(
        small,
        loss={
            **small["loss"],
            "cls_weight": 3.0,
            "focal_gamma": 1.5,
            "box_weight": 0.5,
            "reg_weights": [1.0] * 10,
            "detach_centerness_target": True,
        },
        matching={**small["matching"], "reg_weights": [1.0] * 10, "dn_noise_scale": [1.0] * 10},
    )
    head = build_model(changed, anchor).head
    assert (head.loss_cls.loss_weight, head.loss_cls.gamma, head.loss_cls.alpha) == (3.0, 1.5, 0.25)
    assert head.loss_reg.loss_box.loss_weight == 0.5
    assert head.loss_reg.detach_centerness_target is True
    assert head.reg_weights == [1.0] * 10
    assert head.target_assigner.reg_weights == [1.0] * 10
    assert list(head.target_assigner.dn_noise_scale) == [1.0] * 10
