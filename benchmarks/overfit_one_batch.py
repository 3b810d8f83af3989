"""Learning check: can the demo model fit one fixed batch? Separates "too short a schedule" from
"a broken path" when the demo's mAP is low.

Trains the `model` section of params.yaml on one fixed batch of two training frames (test-time
geometry, no photometric distortion, single-frame: the instance bank is reset every step) and,
every 25 iterations, runs the inference path (decoder included) on the first frame and counts
the ground-truth objects found: right class, score > 0.3, centre within 2 m.

With --temporal the two frames are consecutive key frames of one scene, trained as a sequence
at batch 1 (the instance bank and the temporal denoising carry over from the first frame to the
second, as in training); inference runs both frames in order and also reports, on the second
frame, the speed predicted for the found objects that move (faster than 1 m/s) against their
true speed, and the speed predicted there when the second frame is run alone (no history):
whether the velocity path learns at all, apart from the schedule, and from the frames' motion
rather than from one frame's appearance.

Run after `dvc repro anchors`:  python -m benchmarks.overfit_one_batch [--iters 200] [--lr 2e-3]
                                python -m benchmarks.overfit_one_batch --temporal [--frames 3 4]
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np
import torch
import yaml

from model import build_model
from pipeline.dataset import Sparse4DDataset, collate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--infos", default="data/infos/nuscenes_infos_train.pkl")
    parser.add_argument("--anchors", default="data/anchors/nuscenes_kmeans.npy")
    parser.add_argument("--frames", type=int, nargs=2, help="info indices (default 3 20; --temporal: 3 4)")
    parser.add_argument("--temporal", action="store_true", help="consecutive frames trained as a sequence")
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--lr", type=float, default=2e-3)
    args = parser.parse_args()
    args.frames = args.frames or ([3, 4] if args.temporal else [3, 20])
    torch.manual_seed(0)
    np.random.seed(0)
    params = yaml.safe_load(Path(args.params).read_text())
    mp, dp = params["model"], params["data"]
    # the profile's data settings, with the reference's exact images and no photometric distortion
    settings = dict(
        data_aug_conf=dp["aug"],
        sequences_split_num=int(dp["sequences_split_num"]),
        fast_images=False,
        use_valid_flag=bool(dp["use_valid_flag"]),
        photometric=False,
    )
    train_set = Sparse4DDataset(args.infos, mp["classes"], **settings)
    test_set = Sparse4DDataset(args.infos, mp["classes"], test_mode=True, **settings)
    aug = test_set.get_augmentation()
    items = [train_set[{"idx": i, "aug_config": aug}] for i in args.frames]
    if args.temporal:
        check_consecutive(train_set, args.frames)
        batches = [collate([item]) for item in items]
    else:
        batches = [collate(items)]
    model = build_model(dict(mp), np.load(args.anchors)).use_channels_last()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-3)

    def infer(frames: list[int]) -> dict:
        """Inference over `frames` in order (the instance bank carries over); the last frame's result."""
        model.head.instance_bank.reset()
        with torch.no_grad():
            return [model(collate([test_set[i]]))[0] for i in frames][-1]

    def found() -> str:
        model.eval()
        result = infer(args.frames if args.temporal else args.frames[:1])
        alone = infer(args.frames[1:]) if args.temporal else None  # the second frame without history
        model.train()
        target = batches[-1]
        boxes, labels = target["gt_bboxes_3d"][0].numpy(), target["gt_labels_3d"][0].numpy()
        hits, speeds = 0, []
        for box, cls in zip(boxes, labels):
            pred = nearest(result, box, cls)
            if pred is None:
                continue
            hits += 1
            if alone is not None and speed(box) > 1.0:  # a moving object
                single = nearest(alone, box, cls)
                speeds.append((speed(box), speed(pred), np.nan if single is None else speed(single)))
        text = f"max score {result['scores_3d'].max():.3f}, objects found {hits}/{len(boxes)}"
        if speeds:
            true, predicted, single = np.array(speeds).T
            text += f"; {len(speeds)} moving found: speed {true.mean():.2f} m/s, predicted {predicted.mean():.2f}"
            text += f" (error {np.abs(true - predicted).mean():.2f}); without the first frame {np.nanmean(single):.2f}"
        return text

    model.train()
    for it in range(args.iters + 1):
        model.head.instance_bank.reset()
        model.head.target_assigner.dn_metas = None
        loss = 0.0
        for frame in batches:  # one batch of two frames, or (--temporal) the two frames in order
            losses = model(frame)
            loss = loss + sum(losses.values())
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 25.0)
        optimizer.step()
        if it % 25 == 0:
            last = max(int(k.rsplit("_", 1)[1]) for k in losses if re.fullmatch(r"loss_cls_\d+", k))
            print(
                f"iteration {it:4d}: class loss {losses[f'loss_cls_{last}'].item():.3f}, "
                f"box loss {losses[f'loss_box_{last}'].item():.3f}; {found()}",
                flush=True,
            )


def nearest(result: dict, box: np.ndarray, cls: int) -> np.ndarray | None:
    """The prediction of class `cls` with score > 0.3 nearest to `box`, if its centre is within 2 m."""
    keep = (result["scores_3d"].numpy() > 0.3) & (result["labels_3d"].numpy() == cls)
    pred = result["boxes_3d"].numpy()[keep]
    if not len(pred):
        return None
    dist = np.hypot(pred[:, 0] - box[0], pred[:, 1] - box[1])
    return pred[dist.argmin()] if dist.min() < 2.0 else None


def speed(box: np.ndarray) -> float:
    """Ground speed of a box (columns 7, 8: vx, vy in the data's and the decoder's layout)."""
    return float(np.hypot(box[7], box[8]))


def check_consecutive(dataset: Sparse4DDataset, frames: list[int]) -> None:
    a, b = (dataset.data_infos[i] for i in frames)
    gap = (b["timestamp"] - a["timestamp"]) / 1e6
    if not 0 < gap <= 1.0:
        raise SystemExit(
            f"--frames {frames[0]} {frames[1]}: not consecutive key frames of one scene ({gap:.1f} s apart)"
        )


if __name__ == "__main__":
    main()
