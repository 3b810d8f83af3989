"""Learning check: can the demo model fit one fixed batch? Separates "too short a schedule" from
"a broken path" when the demo's mAP is low.

Trains the `model` section of params.yaml on one fixed batch of two training frames (test-time
geometry, no photometric distortion, single-frame: the instance bank is reset every step) and,
every 25 iterations, runs the inference path (decoder included) on the first frame and counts
the ground-truth objects found: right class, score > 0.3, centre within 2 m.

Run after `dvc repro anchors`:  python -m benchmarks.overfit_one_batch [--iters 200] [--lr 2e-3]
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
    parser.add_argument("--frames", type=int, nargs=2, default=[3, 20])
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--lr", type=float, default=2e-3)
    args = parser.parse_args()
    torch.manual_seed(0)
    np.random.seed(0)
    params = yaml.safe_load(Path(args.params).read_text())
    mp, aug_conf = params["model"], params["data"]["aug"]
    train_set = Sparse4DDataset(args.infos, mp["classes"], aug_conf, photometric=False)
    test_set = Sparse4DDataset(args.infos, mp["classes"], aug_conf, test_mode=True)
    aug = test_set.get_augmentation()
    batch = collate([train_set[{"idx": i, "aug_config": aug}] for i in args.frames])
    model = build_model(dict(mp), np.load(args.anchors)).use_channels_last()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-3)

    def found() -> str:
        model.eval()
        model.head.instance_bank.reset()
        result = model(collate([test_set[args.frames[0]]]))[0]
        model.train()
        boxes, labels = batch["gt_bboxes_3d"][0].numpy(), batch["gt_labels_3d"][0].numpy()
        pred, score, label = result["boxes_3d"].numpy(), result["scores_3d"].numpy(), result["labels_3d"].numpy()
        hits = 0
        for box, cls in zip(boxes, labels):
            ok = (score > 0.3) & (label == cls)
            hits += bool(ok.any() and np.hypot(pred[ok, 0] - box[0], pred[ok, 1] - box[1]).min() < 2.0)
        return f"max score {score.max():.3f}, objects found {hits}/{len(boxes)}"

    model.train()
    for it in range(args.iters + 1):
        model.head.instance_bank.reset()
        model.head.target_assigner.dn_metas = None
        losses = model(batch)
        loss = sum(losses.values())
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 25.0)
        optimizer.step()
        if it % 25 == 0:
            last = max(int(k.rsplit("_", 1)[1]) for k in losses if re.fullmatch(r"loss_cls_\d+", k))
            print(
                f"iteration {it:4d}: class loss {float(losses[f'loss_cls_{last}']):.3f}, "
                f"box loss {float(losses[f'loss_box_{last}']):.3f}; {found()}",
                flush=True,
            )


if __name__ == "__main__":
    main()
