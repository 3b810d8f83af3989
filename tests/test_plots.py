"""`dvc plots diff` compares two runs: the training curves and the per-class AP bars of both
revisions in one page, read from the DVC cache (the plot data are cached stage outputs)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import yaml

from tests.conftest import ROOT
from tests.test_dag import dvc, stand_ins

TRAIN = "runs/train/live/plots/metrics/train"
# a 1 x 1 PNG (a trailing byte after IEND tells the runs apart)
PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c63f8cfc0f01f0005000201a5d0f9b40000000049454e44ae426082"
)
CLASSES = yaml.safe_load((ROOT / "params.yaml").read_text())["model"]["classes"]


def fake_run(work, scale: float) -> None:
    """The files the train and evaluate stages write for dvc plots, with values scaled by `scale`
    (no validation curves: train.eval_interval 0)."""
    live = work / TRAIN
    live.mkdir(parents=True, exist_ok=True)
    for name in ["loss", "lr", "grad_norm", "step_time_s", "loss_dense_depth"] + [
        f"loss_{term}_{i}" for term in ("cls", "box", "cls_dn", "box_dn", "cns", "yns") for i in range(3)
    ]:
        rows = [f"{step}\t{scale * (10 - step) / 10:.4f}" for step in range(5)]
        (live / f"{name}.tsv").write_text("\n".join([f"step\t{name}", *rows]) + "\n")
    pictures = work / "plots" / "evaluate"
    pictures.mkdir(parents=True, exist_ok=True)
    (pictures / "per_class_ap.png").write_bytes(PNG + bytes([int(scale * 10)]))
    out = work / "runs" / "evaluate"
    (out / "nuscenes_eval" / "pr").mkdir(parents=True, exist_ok=True)
    ap = {name: round(scale * (i + 1) / 20, 4) for i, name in enumerate(CLASSES)}
    (out / "per_class_ap.csv").write_text("class,AP\n" + "".join(f"{k},{v}\n" for k, v in ap.items()))
    (out / "per_class_amota.csv").write_text("class,AMOTA\ncar,0.1\npedestrian,0.2\n")
    for th in ("0.5", "1", "2", "4"):
        rows = [f"{r / 10:.4f}," + ",".join(f"{scale * (1 - r / 10):.4f}" for _ in CLASSES) for r in range(11)]
        (out / "nuscenes_eval" / "pr" / f"dist_{th}m.csv").write_text(
            "\n".join(["recall," + ",".join(CLASSES), *rows]) + "\n"
        )


def git(work, *args: str) -> str:
    cmd = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com", *args]
    return subprocess.run(cmd, cwd=work, check=True, capture_output=True, text=True).stdout


def test_plots_diff_shows_both_runs_loss_curves_and_ap_bars(project, tmp_path):  # noqa: F811
    """Two recorded runs (outputs committed to the DVC cache, dvc.lock to git), the workspace's
    copies then deleted: `dvc plots diff` still draws both runs' loss curves, per-class AP bars
    and PR curves, each point tagged with its revision; the titled charts are in the HTML."""
    revs = []
    for scale in (1.0, 0.5):
        fake_run(project, scale)
        stand_ins(project)
        dvc(project, "commit", "--force")
        git(project, "add", "dvc.lock")
        git(project, "commit", "-qm", f"run at scale {scale}")
        revs.append(git(project, "rev-parse", "--short", "HEAD").strip())
    # the plot data of both revisions must come from the cache, not the workspace
    shutil.rmtree(project / "runs")
    shutil.rmtree(project / "plots")

    out = json.loads(dvc(project, "plots", "diff", *revs, "--json", "-o", str(tmp_path / "json")))
    # Files that a run does not write are reported, nothing else: the layers a 3-decoder model
    # does not have (listed for the 6 of params-full.yaml) and the val curves (validation off).
    errors = {(e["source"], e["type"]) for e in out.get("errors", [])}
    unexpected = {
        (source, kind)
        for source, kind in errors
        if kind != "FileNotFoundError" or not re.search(r"/(val/\w+|train/loss_\w+_[345])\.tsv$", source)
    }
    assert not unexpected, unexpected
    out = out.get("data", out)

    def points(plot_id: str) -> list[dict]:
        assert plot_id in out, f"no plot {plot_id} in {sorted(out)}"
        return [p for plot in out[plot_id] for p in plot["content"]["data"]["values"]]

    loss = points("loss")
    for rev, scale in zip(revs, (1.0, 0.5)):
        mine = {int(p["step"]): float(p["loss"]) for p in loss if p["rev"] == rev}
        assert mine == {s: round(scale * (10 - s) / 10, 4) for s in range(5)}, (rev, mine)
    ap = points("per_class_ap")
    for rev, scale in zip(revs, (1.0, 0.5)):
        bars = {p["class"]: float(p["AP"]) for p in ap if p["rev"] == rev}
        assert bars == {name: round(scale * (i + 1) / 20, 4) for i, name in enumerate(CLASSES)}, (rev, bars)
    cls = points("loss_classification")
    # one line per decoder layer and run in the grouped chart
    lines = {(p["rev"], p["filename::field"]) for p in cls}
    assert lines == {(r, f"loss_cls_{i}.tsv::loss_cls_{i}") for r in revs for i in range(3)}, lines
    pr = points("pr_2m")
    assert {(p["rev"], p["field"]) for p in pr} == {(r, name) for r in revs for name in CLASSES}
    images = out["plots/evaluate/per_class_ap.png"]
    assert sorted(rev for image in images for rev in image["revisions"]) == sorted(revs), images
    # validation was off: no val curves, and the chart is simply absent
    assert not out.get("validation"), out["validation"]

    dvc(project, "plots", "diff", *revs, "-o", str(tmp_path / "html"))
    html = (tmp_path / "html" / "index.html").read_text()
    for text in ("training loss (total, smoothed)", "per-class AP", "learning rate", revs[0], revs[1]):
        assert text in html, text


def test_evaluate_writes_the_per_class_and_pr_data_dvc_yaml_draws(tmp_path):
    """The files the per_class_ap, per_class_amota and pr_* charts read, with the columns
    dvc.yaml names, from per-class results and the devkit's metric data."""
    from types import SimpleNamespace

    import numpy as np

    from pipeline.metrics import per_class_table, pr_curve_tables

    ap = {name: i / 10 for i, name in enumerate(CLASSES)}
    per_class_table(ap, {"car": 0.25, "bus": 0.5}, str(tmp_path))
    lines = (tmp_path / "per_class_ap.csv").read_text().splitlines()
    assert lines[0] == "class,AP" and lines[1:] == [f"{n},{v:.4f}" for n, v in ap.items()]
    assert (tmp_path / "per_class_amota.csv").read_text() == "class,AMOTA\ncar,0.2500\nbus,0.5000\n"

    recall = np.linspace(0, 1, 101)
    data = {(n, th): SimpleNamespace(recall=recall, precision=(1 - recall) * th) for n in CLASSES for th in (0.5, 2.0)}
    pr_curve_tables(data, CLASSES, [0.5, 2.0], str(tmp_path / "pr"))
    assert sorted(p.name for p in (tmp_path / "pr").iterdir()) == ["dist_0.5m.csv", "dist_2m.csv"]
    rows = (tmp_path / "pr" / "dist_2m.csv").read_text().splitlines()
    assert rows[0].split(",") == ["recall", *CLASSES] and len(rows) == 102
    assert rows[1].split(",") == ["0.0000", *["2.0000"] * len(CLASSES)]
    # every PR chart in dvc.yaml reads a file the devkit's thresholds produce, with these columns
    plots = {
        next(iter(p)): p[next(iter(p))]
        for p in yaml.safe_load((ROOT / "dvc.yaml").read_text())["plots"]
        if isinstance(p, dict)
    }
    for th in ("0.5", "1", "2", "4"):
        ((source, columns),) = plots[f"pr_{th.replace('.', '_')}m"]["y"].items()
        assert source.endswith(f"pr/dist_{th}m.csv") and sorted(columns) == sorted(CLASSES), source
