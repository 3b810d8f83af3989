"""3D-box specific parts of the head: anchor encoder and the refinement (box, class, quality)."""

from __future__ import annotations

import torch
import torch.nn as nn
from mmcv.cnn import Linear, Scale, bias_init_with_prob

from model.blocks import linear_relu_ln
from model.box3d import COS_YAW, HEIGHT, LENGTH, SIN_YAW, VX, WIDTH, X, Y, Z


class AnchorEncoder(nn.Module):
    """Decoupled anchor embedding: separate MLPs for position, size, yaw and velocity, concatenated
    ([E/2, E/8, E/8, E/4] channels for embed_dims E, i.e. [128, 32, 32, 64] at 256)."""

    def __init__(self, embed_dims: list[int], vel_dims: int = 3, out_loops: int = 4):
        super().__init__()
        self.vel_dims = vel_dims

        def mlp(input_dims: int, output_dims: int) -> nn.Sequential:
            return nn.Sequential(*linear_relu_ln(output_dims, 1, out_loops, input_dims))

        self.pos_fc = mlp(3, embed_dims[0])
        self.size_fc = mlp(3, embed_dims[1])
        self.yaw_fc = mlp(2, embed_dims[2])
        self.vel_fc = mlp(vel_dims, embed_dims[3])

    def forward(self, box: torch.Tensor) -> torch.Tensor:
        """(bs, n, 11) -> (bs, n, sum(embed_dims))."""
        return torch.cat(
            [
                self.pos_fc(box[..., [X, Y, Z]]),
                self.size_fc(box[..., [LENGTH, WIDTH, HEIGHT]]),
                self.yaw_fc(box[..., [SIN_YAW, COS_YAW]]),
                self.vel_fc(box[..., VX : VX + self.vel_dims]),
            ],
            dim=-1,
        )


class RefinementModule(nn.Module):
    """Predicts the refined anchor (position, size and yaw as residuals; velocity from the
    predicted displacement over the frame interval), class logits and quality (centerness,
    yawness)."""

    def __init__(self, embed_dims: int, num_cls: int, output_dim: int = 11):
        super().__init__()
        self.output_dim = output_dim
        self.refine_state = [X, Y, Z, LENGTH, WIDTH, HEIGHT, SIN_YAW, COS_YAW]
        self.layers = nn.Sequential(
            *linear_relu_ln(embed_dims, 2, 2), Linear(embed_dims, output_dim), Scale([1.0] * output_dim)
        )
        self.cls_layers = nn.Sequential(*linear_relu_ln(embed_dims, 1, 2), Linear(embed_dims, num_cls))
        self.quality_layers = nn.Sequential(*linear_relu_ln(embed_dims, 1, 2), Linear(embed_dims, 2))

    def init_weight(self) -> None:
        nn.init.constant_(self.cls_layers[-1].bias, bias_init_with_prob(0.01))

    def forward(
        self,
        instance_feature: torch.Tensor,
        anchor: torch.Tensor,
        anchor_embed: torch.Tensor,
        time_interval: torch.Tensor,
        return_cls: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """instance_feature, anchor_embed (bs, n, C); anchor (bs, n, 11); time_interval (bs,).
        Returns the refined anchor (bs, n, 11), class logits (bs, n, num_cls) and quality (bs, n, 2)."""
        feature = instance_feature + anchor_embed
        output = self.layers(feature)
        refined = output[..., self.refine_state] + anchor[..., self.refine_state]
        # The velocity head predicts a displacement over the frame interval.
        velocity = (output[..., VX:].transpose(0, -1) / time_interval).transpose(0, -1) + anchor[..., VX:]
        output = torch.cat([refined, velocity], dim=-1)
        cls = self.cls_layers(instance_feature) if return_cls else None
        quality = self.quality_layers(feature) if return_cls else None
        return output, cls, quality
