"""Post-processing: turns the last decoder's outputs into boxes: top-k over (instance, class) scores, weighted by
the predicted centerness, boxes decoded to x, y, z, l, w, h, yaw, vx, vy, vz (LiDAR frame, model.box3d)."""

from __future__ import annotations

import torch

from model.box3d import CNS, COS_YAW, HEIGHT, LENGTH, SIN_YAW, VX, WIDTH, X, Y, Z


def decode_box(box: torch.Tensor) -> torch.Tensor:
    """(n, 11) encoded -> (n, 10) decoded."""
    yaw = torch.atan2(box[:, SIN_YAW], box[:, COS_YAW])
    return torch.cat([box[:, [X, Y, Z]], box[:, [LENGTH, WIDTH, HEIGHT]].exp(), yaw[:, None], box[:, VX:]], dim=-1)


class BoxPostProcessor:
    """Post-processing of the last decoder's outputs (the reference's `SparseBox3DDecoder`).

    `cls_scores` (the class confidence before quality weighting, which the reference's tracking
    output thresholds) keeps the reference's order by default: top-k order, not re-sorted with
    the quality-weighted boxes, so entry i belongs to the i-th top-k candidate rather than to
    box i. `sort_cls_scores` re-sorts it with the boxes.
    """

    def __init__(self, *, num_output: int, sort_cls_scores: bool, score_threshold: float | None = None):
        self.num_output, self.score_threshold = num_output, score_threshold
        self.sort_cls_scores = sort_cls_scores

    def decode(self, cls_scores, box_preds, instance_id=None, quality=None, output_idx: int = -1) -> list[dict]:
        """Lists over decoders of (bs, n, num_cls) logits, (bs, n, 11) boxes, (bs, n, 2) quality;
        instance_id (bs, n) when tracking. Returns per sample boxes_3d (k, 10), scores_3d (k,),
        labels_3d (k,), cls_scores (k,) before quality weighting, and instance_ids when tracking."""
        squeeze_cls = instance_id is not None
        scores = cls_scores[output_idx].sigmoid()
        if squeeze_cls:
            scores, cls_ids = scores.max(dim=-1)
            scores = scores.unsqueeze(-1)
        boxes = box_preds[output_idx]
        bs, _, num_cls = scores.shape
        scores, indices = scores.flatten(start_dim=1).topk(min(self.num_output, scores[0].numel()), dim=1)
        if not squeeze_cls:
            cls_ids = indices % num_cls
        mask = scores >= self.score_threshold if self.score_threshold is not None else None
        scores_origin = scores
        if quality is not None:
            centerness = torch.gather(quality[output_idx][..., CNS], 1, indices // num_cls)
            scores = scores * centerness.sigmoid()
            scores, order = torch.sort(scores, dim=1, descending=True)
            if self.sort_cls_scores:
                scores_origin = torch.gather(scores_origin, 1, order)
            if not squeeze_cls:
                cls_ids = torch.gather(cls_ids, 1, order)
            if mask is not None:
                mask = torch.gather(mask, 1, order)
            indices = torch.gather(indices, 1, order)
        output = []
        for i in range(bs):
            labels = cls_ids[i][indices[i]] if squeeze_cls else cls_ids[i]
            keep = mask[i] if mask is not None else slice(None)
            result = {
                "boxes_3d": decode_box(boxes[i, indices[i] // num_cls][keep]).float().cpu(),
                "scores_3d": scores[i][keep].float().cpu(),
                "labels_3d": labels[keep].cpu(),
                "cls_scores": scores_origin[i][keep].float().cpu(),
            }
            if instance_id is not None:
                result["instance_ids"] = instance_id[i, indices[i]][keep].cpu()
            output.append(result)
        return output
