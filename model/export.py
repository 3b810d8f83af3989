"""One frame of Sparse4Dv3 inference as a traceable graph, for ONNX export.

The eager model keeps the instance bank's state between calls in Python attributes and takes
different branches on the first frame; a deployed graph cannot. :class:`InferenceStep` holds the
same network (the detector's modules, not copies) and computes one frame with that state as
explicit inputs and outputs, in tensors only:

* the first frame of a run and every later one are the same graph: ``has_history`` (False on the
  first frame) selects, per sample, what the eager model would do. Where the two differ in
  computation (the temporal decoders' attention: over last frame's instances, or over the
  current ones on a first frame), both are computed and ``Where`` picks one;
* last frame's instances (anchors, features, confidences, tracking ids) come in as
  ``cached_*`` and the next frame's go out as ``next_*``; ``prev_id`` counts the ids handed out;
* the deformable aggregation runs ``backend="exportable"`` (grid_sample with the op's border
  rule), the only formulation in standard ONNX operators;
* the outputs are the post-processor's tracking-mode boxes (``BoxPostProcessor.decode`` with
  instance ids), batched.

What the caller computes per frame, exactly as the eager model does from its metas:
``temp2cur = T_global_inv(current) @ T_global(previous)`` in float64, then float32;
``time_interval = timestamp(current) - timestamp(previous)`` in seconds, float64, then float32.
``pipeline.export`` runs the eager model and this graph side by side and checks them.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import torch
import torch.nn as nn

from model.box3d import CNS
from model.instance_bank import topk
from model.post_process import decode_box

# name, shape (symbols: bs, cams, H, W, the model's sizes), dtype, meaning
INPUTS: List[Tuple[str, str, str, str]] = [
    ("img", "bs, cams, 3, H, W", "float32", "normalised images (the dataset's test pipeline), the model's input size"),
    ("projection_mat", "bs, cams, 4, 4", "float32", "LiDAR -> image pixels per camera (the dataset's lidar2img)"),
    ("image_wh", "bs, cams, 2", "float32", "input image width and height per camera"),
    ("temp2cur", "bs, 4, 4", "float32", "previous LiDAR frame -> current one (T_global_inv @ T_global_prev)"),
    ("time_interval", "bs", "float32", "seconds since the previous frame (any value on a first frame)"),
    ("has_history", "bs", "bool", "False on the first frame of a run: the cached_* inputs are ignored"),
    ("cached_anchor", "bs, num_temp, 11", "float32", "next_anchor of the previous frame (zeros on a first frame)"),
    ("cached_feature", "bs, num_temp, C", "float32", "next_feature of the previous frame (zeros)"),
    ("cached_confidence", "bs, num_temp", "float32", "next_confidence of the previous frame (zeros)"),
    ("cached_id", "bs, num_temp", "int64", "next_id of the previous frame (-1)"),
    ("prev_id", "1", "int64", "next_prev_id of the previous frame: ids handed out so far (0)"),
]
OUTPUTS: List[Tuple[str, str, str, str]] = [
    ("boxes", "bs, num_output, 10", "float32", "x, y, z, l, w, h, yaw, vx, vy, vz in the LiDAR frame, by score"),
    ("scores", "bs, num_output", "float32", "class score x centerness, descending"),
    ("labels", "bs, num_output", "int64", "class index (model.classes)"),
    ("cls_scores", "bs, num_output", "float32", "class score before centerness, in the reference's order"),
    ("instance_ids", "bs, num_output", "int64", "tracking ids"),
    ("next_anchor", "bs, num_temp, 11", "float32", "instances kept for the next frame: anchors"),
    ("next_feature", "bs, num_temp, C", "float32", "their features"),
    ("next_confidence", "bs, num_temp", "float32", "their decayed confidences"),
    ("next_id", "bs, num_temp", "int64", "their tracking ids"),
    ("next_prev_id", "1", "int64", "ids handed out so far"),
]


class ExportError(ValueError):
    """A model the exported graph cannot represent."""


class InferenceStep(nn.Module):
    """The detector's inference step with the instance bank's state as inputs and outputs (see the module)."""

    def __init__(self, detector: nn.Module):
        super().__init__()
        head = detector.head
        bank = head.instance_bank
        if bank.num_temp_instances <= 0:
            raise ExportError("model.num_temp_instances is 0: the export covers the temporal model only")
        if head.post_processor.score_threshold is not None:
            raise ExportError("the post-processor has a score threshold: the export gives a fixed number of boxes")
        self.detector = detector

    def sizes(self) -> Dict[str, int]:
        head = self.detector.head
        bank = head.instance_bank
        return {
            "num_anchor": bank.num_anchor,
            "num_temp": bank.num_temp_instances,
            "C": head.embed_dims,
            "num_output": min(head.post_processor.num_output, bank.num_anchor),
        }

    def initial_state(self, batch_size: int = 1) -> Dict[str, torch.Tensor]:
        """The state inputs of a first frame."""
        s = self.sizes()
        return {
            "has_history": torch.zeros(batch_size, dtype=torch.bool),
            "cached_anchor": torch.zeros(batch_size, s["num_temp"], 11),
            "cached_feature": torch.zeros(batch_size, s["num_temp"], s["C"]),
            "cached_confidence": torch.zeros(batch_size, s["num_temp"]),
            "cached_id": torch.full((batch_size, s["num_temp"]), -1, dtype=torch.long),
            "prev_id": torch.zeros(1, dtype=torch.long),
        }

    def forward(
        self,
        img: torch.Tensor,
        projection_mat: torch.Tensor,
        image_wh: torch.Tensor,
        temp2cur: torch.Tensor,
        time_interval: torch.Tensor,
        has_history: torch.Tensor,
        cached_anchor: torch.Tensor,
        cached_feature: torch.Tensor,
        cached_confidence: torch.Tensor,
        cached_id: torch.Tensor,
        prev_id: torch.Tensor,
    ) -> Tuple[torch.Tensor, ...]:
        aggregations = [m for m in self.detector.modules() if hasattr(m, "backend")]
        backends = [m.backend for m in aggregations]
        for m in aggregations:
            m.backend = "exportable"
        try:
            return self._step(
                img, projection_mat, image_wh, temp2cur, time_interval, has_history,
                cached_anchor, cached_feature, cached_confidence, cached_id, prev_id,
            )  # fmt: skip
        finally:
            for m, backend in zip(aggregations, backends):
                m.backend = backend

    def _step(
        self, img, projection_mat, image_wh, temp2cur, time_interval, has_history,
        cached_anchor, cached_feature, cached_confidence, cached_id, prev_id,
    ) -> Tuple[torch.Tensor, ...]:  # fmt: skip
        """forward, with every deformable aggregation on the exportable formulation."""
        head = self.detector.head
        bank = head.instance_bank
        num_temp, num_anchor = bank.num_temp_instances, bank.num_anchor
        feature_maps, _ = self.detector.extract_feat(img)
        bs = img.shape[0]

        # InstanceBank.get: the learnable instances, last frame's moved into this one
        instance_feature = bank.instance_feature[None].repeat(bs, 1, 1)
        anchor = bank.anchor[None].repeat(bs, 1, 1)
        mask = has_history & (time_interval.abs() <= bank.max_time_interval)
        temp_anchor = bank.anchor_handler.anchor_projection(
            cached_anchor, temp2cur, -time_interval, bank.correct_projected_yaw
        )
        time_interval = torch.where(
            (time_interval != 0) & mask, time_interval, torch.full_like(time_interval, bank.default_time_interval)
        )
        temp_feature = cached_feature
        history = has_history[:, None, None]

        anchor_embed = head.anchor_encoder(anchor)
        temp_anchor_embed = head.anchor_encoder(temp_anchor)
        # -1 (no id yet) made by integer arithmetic: torch 2.1's exporter types a folded integer
        # constant in Where as float
        instance_id = cached_id * 0 - 1
        num_refined, last = 0, len(head.operation_order) - 1
        cls = quality = None
        for i, op in enumerate(head.operation_order):
            layer = head.layers[i]
            if op == "temp_gnn":
                with_history = head.graph_model(
                    i, instance_feature, temp_feature, temp_feature, query_pos=anchor_embed, key_pos=temp_anchor_embed
                )
                alone = head.graph_model(i, instance_feature, query_pos=anchor_embed)  # the eager model's first frame
                instance_feature = torch.where(history, with_history, alone)
            elif op == "gnn":
                instance_feature = head.graph_model(i, instance_feature, value=instance_feature, query_pos=anchor_embed)
            elif op == "deformable":
                instance_feature = layer(instance_feature, anchor, anchor_embed, feature_maps, projection_mat, image_wh)
            elif op != "refine":
                instance_feature = layer(instance_feature)  # norm, ffn
            else:
                num_refined += 1
                anchor, cls, quality = layer(
                    instance_feature,
                    anchor,
                    anchor_embed,
                    time_interval=time_interval,
                    return_cls=num_refined == head.num_single_frame_decoder or i == last,
                )
                if num_refined == head.num_single_frame_decoder:
                    # InstanceBank.update: last frame's instances in front of the best new ones
                    _, (selected_feature, selected_anchor) = topk(
                        cls.max(dim=-1).values, num_anchor - num_temp, instance_feature, anchor
                    )
                    keep = mask[:, None, None]
                    instance_feature = torch.where(
                        keep, torch.cat([temp_feature, selected_feature], 1), instance_feature
                    )
                    anchor = torch.where(keep, torch.cat([temp_anchor, selected_anchor], 1), anchor)
                    instance_id = torch.where(mask[:, None], cached_id, instance_id)
                if i != last:
                    anchor_embed = head.anchor_encoder(anchor)
                if num_refined > head.num_single_frame_decoder:
                    temp_anchor_embed = anchor_embed[:, :num_temp]

        # InstanceBank.cache: the best instances for the next frame, confidences decayed
        score = cls.max(dim=-1).values.sigmoid()
        decayed = torch.maximum(cached_confidence * bank.confidence_decay, score[:, :num_temp])
        confidence = torch.cat(
            [torch.where(has_history[:, None], decayed, score[:, :num_temp]), score[:, num_temp:]], 1
        )
        next_confidence, (next_feature, next_anchor) = topk(confidence, num_temp, instance_feature, anchor)

        # InstanceBank.get_instance_id: carried-over ids stay, new instances get the next ones in order
        no_id = instance_id[:, :1].repeat(1, num_anchor - num_temp) * 0 - 1
        ids = torch.cat([instance_id, no_id], 1)
        new = ids < 0
        counted = torch.cumsum(new.reshape(-1).long(), 0).reshape(bs, num_anchor)
        ids = torch.where(new, prev_id + counted - 1, ids)
        next_prev_id = prev_id + new.long().sum().reshape(1)
        next_id = topk(confidence, num_temp, ids)[1][0].squeeze(-1)

        # BoxPostProcessor.decode in tracking mode (one class per instance)
        post = head.post_processor
        cls_score, labels = cls.sigmoid().max(dim=-1)
        cls_score, indices = cls_score.topk(min(post.num_output, num_anchor), dim=1)
        scores = cls_score * torch.gather(quality[..., CNS], 1, indices).sigmoid()
        scores, order = torch.sort(scores, dim=1, descending=True)
        if post.sort_cls_scores:
            cls_score = torch.gather(cls_score, 1, order)
        indices = torch.gather(indices, 1, order)
        k = indices.shape[1]
        boxes = torch.gather(anchor, 1, indices[..., None].expand(bs, k, anchor.shape[-1]))
        boxes = decode_box(boxes.reshape(bs * k, -1)).reshape(bs, k, -1)
        labels = torch.gather(labels, 1, indices)
        instance_ids = torch.gather(ids, 1, indices)
        return (
            boxes,
            scores,
            labels,
            cls_score,
            instance_ids,
            next_anchor,
            next_feature,
            next_confidence,
            next_id.long(),
            next_prev_id,
        )
