"""Losses with the reference's weights: sigmoid focal (classification), L1 box, centerness BCE,
yawness Gaussian focal; classes whose boxes have no front/back (barrier) may have their yaw
target reversed to the nearer direction."""

from __future__ import annotations

import torch
import torch.nn as nn
from mmdet.models.losses import CrossEntropyLoss, GaussianFocalLoss, L1Loss

from model.box3d import CNS, COS_YAW, SIN_YAW, YNS, X, Y, Z


def as_fp32(x: torch.Tensor) -> torch.Tensor:
    """Half precision up to fp32, anything else as it is (mmcv's `force_fp32`: float64 stays)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


class SigmoidFocalLoss(nn.Module):
    """Sigmoid focal loss over (n, num_cls) logits and (n,) class indices.

    Any target outside [0, num_cls) — background (num_cls), negative denoising queries
    (model.target.NEGATIVE_QUERY), lost temporal queries (NO_TARGET) — is a negative for every
    class, as mmcv's compiled op treats them (mmdet's pure-PyTorch fallback one-hot encodes
    targets and rejects negatives, so this is written out here to run on every device).
    Not torchvision.ops.sigmoid_focal_loss: it multiplies the factors in another order, which
    changes losses and gradients in the last bit (3e-16 in float64), so retraining would not
    reproduce the committed weights.
    """

    def __init__(self, *, gamma: float, alpha: float, loss_weight: float):
        super().__init__()
        self.gamma, self.alpha, self.loss_weight = gamma, alpha, loss_weight

    def forward(self, pred: torch.Tensor, target: torch.Tensor, avg_factor: float | torch.Tensor) -> torch.Tensor:
        pred = as_fp32(pred)
        num_cls = pred.shape[-1]
        classes = torch.arange(num_cls, device=pred.device)
        positive = (target[:, None] == classes[None]).to(pred.dtype)  # (n, num_cls)
        p = pred.sigmoid()
        ce = nn.functional.binary_cross_entropy_with_logits(pred, positive, reduction="none")
        p_t = p * positive + (1 - p) * (1 - positive)
        alpha_t = self.alpha * positive + (1 - self.alpha) * (1 - positive)
        loss = alpha_t * (1 - p_t).pow(self.gamma) * ce
        return self.loss_weight * loss.sum() / avg_factor


class SparseBox3DLoss(nn.Module):
    def __init__(self, *, box_weight: float, cls_allow_reverse: list[int] | None, detach_centerness_target: bool):
        super().__init__()
        self.loss_box = L1Loss(loss_weight=box_weight)
        self.loss_cns = CrossEntropyLoss(use_sigmoid=True)
        self.loss_yns = GaussianFocalLoss()
        self.cls_allow_reverse = cls_allow_reverse
        # model.loss.detach_centerness_target: the Ascend port's training (see forward).
        self.detach_centerness_target = detach_centerness_target

    def forward(
        self, box, box_target, weight=None, avg_factor=None, suffix="", quality=None, cls_target=None
    ) -> dict[str, torch.Tensor]:
        """box, box_target, weight (n, 10) encoded; quality (n, 2) logits; cls_target (n,)."""
        box, box_target = as_fp32(box), as_fp32(box_target)
        if self.cls_allow_reverse is not None and cls_target is not None:
            yaw_t = box_target[..., [SIN_YAW, COS_YAW]]
            reverse = nn.functional.cosine_similarity(yaw_t, box[..., [SIN_YAW, COS_YAW]], dim=-1) < 0
            reverse = torch.isin(cls_target, cls_target.new_tensor(self.cls_allow_reverse)) & reverse
            box_target = box_target.clone()
            box_target[..., [SIN_YAW, COS_YAW]] = torch.where(reverse[..., None], -yaw_t, yaw_t)
        output = {f"loss_box{suffix}": self.loss_box(box, box_target, weight=weight, avg_factor=avg_factor)}
        if quality is not None:
            quality = as_fp32(quality)
            # As the reference: the centerness target is built from the prediction itself, with
            # gradients. The Ascend port (DrivingSDK 9c2fb9ea, mmdet.patch) detaches it in mmdet's
            # binary_cross_entropy: detach_centerness_target, for the seed profiles. Either way the
            # loss and its gradient w.r.t. the centerness logit are the same; the box's differs.
            cns_target = torch.exp(-torch.norm(box_target[..., [X, Y, Z]] - box[..., [X, Y, Z]], p=2, dim=-1))
            if self.detach_centerness_target:
                cns_target = cns_target.detach()
            output[f"loss_cns{suffix}"] = self.loss_cns(quality[..., CNS], cns_target, avg_factor=avg_factor)
            yns_target = (
                nn.functional.cosine_similarity(
                    box_target[..., [SIN_YAW, COS_YAW]], box[..., [SIN_YAW, COS_YAW]], dim=-1
                )
                > 0
            ).float()
            output[f"loss_yns{suffix}"] = self.loss_yns(quality[..., YNS].sigmoid(), yns_target, avg_factor=avg_factor)
        return output
