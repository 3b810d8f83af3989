"""The export stage: the ONNX graph computes what the PyTorch model does, in onnxruntime, frame
after frame with the instance bank's state carried through its inputs and outputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from model import build_model
from model.export import INPUTS, OUTPUTS, ExportError, InferenceStep
from pipeline.export import ExportCheckError, compare, compare_state, export, frame_inputs, next_state
from tests.conftest import STAGE_MODEL, model_settings, stage_params


def perturbed_checkpoint(stage_workspace, tmp_path) -> str:
    """The small untrained model with every weight moved by noise: an initialised head scores all
    instances alike (near-ties everywhere), which says little about the graph."""
    state = torch.load(stage_workspace / "model.pth")["state_dict"]
    gen = torch.Generator().manual_seed(0)
    for name, value in state.items():
        if value.is_floating_point() and "instance_bank" not in name and "fix_scale" not in name:
            # the class heads more, so that scores spread and last frame's decayed ones matter
            value += (1.0 if "cls_layers" in name else 0.05) * torch.randn(value.shape, generator=gen)
    path = tmp_path / "model.pth"
    torch.save({"state_dict": state}, path)
    return str(path)


def test_the_step_is_the_eager_model_across_first_frames_history_and_a_gap(
    small_twin, stage_workspace, tmp_path, monkeypatch
):
    """InferenceStep in PyTorch (the graph before export) against the detector itself over the val
    frames, output and carried state, with a 10 s gap before the last two (the eager bank then keeps
    only new instances, but still decays last frame's confidences and keeps counting ids)."""
    from pipeline.dataset import collate, dataset_from_params
    from pipeline.evaluate import eval_model, load_checkpoint

    monkeypatch.chdir(small_twin.parent.parent)
    params = stage_params(small_twin)
    ckpt = load_checkpoint(
        perturbed_checkpoint(stage_workspace, tmp_path), str(stage_workspace / "val.pkl"), "v1.0-mini"
    )
    model = eval_model(ckpt, params["model"], "fp32", torch.device("cpu"))
    dataset = dataset_from_params(params, str(stage_workspace / "val.pkl"), training=False)
    step = InferenceStep(model).eval()
    state, previous = step.initial_state(), None
    model.head.instance_bank.reset()
    with torch.no_grad():
        # the val scene twice (back in time by a second into the second pass), then a 10 s gap
        order = [*range(len(dataset)), *range(len(dataset))]
        for position, frame in enumerate(order):
            batch = collate([dataset[frame]])
            if position >= len(order) - 2:
                batch["timestamp"] = batch["timestamp"] + 10.0
            eager = {k: v.numpy() for k, v in model(batch)[0].items()}
            outputs = step(**frame_inputs(batch, previous), **state)
            named = dict(zip([name for name, *_ in OUTPUTS], [o.numpy() for o in outputs]))
            diffs, rows, differing = compare(frame, eager, named, 1e-4, 0.0)  # every row checked
            assert max(diffs.values()) < 1e-4 and rows == len(eager["instance_ids"]) and differing == 0, diffs
            state, previous = next_state(list(outputs)), batch
            bank = model.head.instance_bank
            np.testing.assert_allclose(state["cached_anchor"].numpy(), bank.cached_anchor.numpy(), atol=1e-4)
            np.testing.assert_allclose(state["cached_confidence"].numpy(), bank.confidence.numpy(), atol=1e-4)
            np.testing.assert_allclose(state["cached_feature"].numpy(), bank.cached_feature.numpy(), atol=1e-4)
            assert torch.equal(state["cached_id"], bank.instance_id[:, : bank.num_temp_instances])
            assert int(state["prev_id"]) == bank.prev_id
    assert bank.prev_id > len(eager["instance_ids"])  # ids kept counting over the frames


def test_export_stage_writes_a_graph_that_onnxruntime_runs_as_pytorch(
    small_twin, stage_workspace, tmp_path, monkeypatch
):
    import onnx

    monkeypatch.chdir(small_twin.parent.parent)
    monkeypatch.setattr("pipeline.evaluate.WARMUP_FRAMES", 1)
    params = stage_params(small_twin)
    params["export"].update(check_frames=0, tolerance=1e-3)
    out, metrics_path = tmp_path / "export", tmp_path / "export.json"
    metrics = export(
        params,
        str(stage_workspace / "val.pkl"),
        perturbed_checkpoint(stage_workspace, tmp_path),
        str(out),
        str(metrics_path),
    )
    assert json.loads(metrics_path.read_text()) == metrics
    assert metrics["frames"] == 3
    assert metrics["max_abs_diff_boxes"] <= 1e-3 and metrics["max_abs_diff_scores"] <= 1e-3
    assert metrics["max_abs_diff_state"] <= 1e-3 and metrics["rows_checked"] > 0
    assert metrics["low_score_rows_differing"] == 0 and metrics["max_abs_diff_boxes_own_state"] <= 1e-3
    assert metrics["onnxruntime_fps"] > 0 and metrics["torch_fps"] > 0
    graph = onnx.load(str(out / "model.onnx"))
    assert [i.name for i in graph.graph.input] == [name for name, *_ in INPUTS]
    assert [o.name for o in graph.graph.output] == [name for name, *_ in OUTPUTS]
    assert "GridSample" in {node.op_type for node in graph.graph.node}  # the exportable aggregation
    io = json.loads((out / "io.json").read_text())
    assert io["sizes"] == {"num_anchor": 20, "num_temp": 10, "C": 32, "num_output": 20}
    shapes = {e["name"]: e["shape"] for e in io["inputs"] + io["outputs"]}
    assert shapes["img"] == [1, 6, 3, 64, 176] and shapes["boxes"] == [1, 20, 10] and shapes["cached_id"] == [1, 10]


def test_a_graph_outside_the_tolerance_is_not_written(small_twin, stage_workspace, tmp_path, monkeypatch):
    monkeypatch.chdir(small_twin.parent.parent)
    params = stage_params(small_twin)
    params["export"].update(check_frames=2, tolerance=1e-12)  # float rounding alone exceeds it
    out = tmp_path / "export"
    with pytest.raises(ExportCheckError, match=r"val frame 0: onnxruntime's boxes differ from PyTorch's by .*1e-12"):
        export(
            params,
            str(stage_workspace / "val.pkl"),
            perturbed_checkpoint(stage_workspace, tmp_path),
            str(out),
            str(tmp_path / "m.json"),
        )
    assert not out.exists() and not (tmp_path / "m.json").exists()
    assert not list(tmp_path.glob(".export*"))  # no temporary folder left either


def test_compare_names_the_frame_and_what_differs():
    eager = {
        "instance_ids": np.array([4, 7, 9]),
        "labels_3d": np.array([0, 1, 2]),
        "boxes_3d": np.arange(30, dtype=np.float32).reshape(3, 10),
        "scores_3d": np.array([0.9, 0.5, 0.01], np.float32),
        "cls_scores": np.array([0.9, 0.6, 0.02], np.float32),
    }
    swapped = [1, 0, 2]  # a near-tie in the graph's order: matched by id, not by rank
    onnx = {
        "instance_ids": eager["instance_ids"][swapped][None],
        "labels": eager["labels_3d"][swapped][None],
        "boxes": eager["boxes_3d"][swapped][None] + 1e-5,
        "scores": eager["scores_3d"][None],
        "cls_scores": eager["cls_scores"][None],
    }
    diffs, rows, differing = compare(3, eager, onnx, 1e-3, 0.05)
    assert diffs["boxes"] == pytest.approx(1e-5, abs=1e-6) and (rows, differing) == (2, 0)
    with pytest.raises(ExportCheckError, match="val frame 3: onnxruntime and PyTorch give different tracking ids"):
        compare(3, eager, {**onnx, "instance_ids": np.array([[4, 7, 8]])}, 1e-3, 0.05)
    with pytest.raises(ExportCheckError, match="val frame 3: .* other labels"):
        compare(3, eager, {**onnx, "labels": np.array([[1, 1, 2]])}, 1e-3, 0.05)
    with pytest.raises(ExportCheckError, match="val frame 3: onnxruntime's scores differ"):
        compare(3, eager, {**onnx, "scores": onnx["scores"] + 0.01}, 1e-3, 0.05)
    # id 9 scores 0.01 on both sides: another instance behind it (a near-tie below min_score) is counted
    other = onnx["boxes"].copy()
    other[0, 2] += 5.0
    assert compare(3, eager, {**onnx, "boxes": other, "labels": np.array([[1, 0, 5]])}, 1e-3, 0.05)[2] == 1
    with pytest.raises(ExportCheckError, match="boxes differ from PyTorch's by 5"):
        compare(3, eager, {**onnx, "boxes": other}, 1e-3, 0.0)  # min_score 0: every row is checked


def test_compare_state_follows_the_kept_instances_by_id():
    eager = {
        "cached_id": np.array([[7, 4, 9]]),
        "cached_confidence": np.array([[0.8, 0.3, 0.01]], np.float32),
        "cached_anchor": np.arange(33, dtype=np.float32).reshape(1, 3, 11),
        "cached_feature": np.ones((1, 3, 4), np.float32),
        "prev_id": np.array([12]),
    }
    order = [1, 0, 2]  # another order, and instance 9 (below min_score) replaced by 11
    onnx = {
        "next_id": np.array([[4, 7, 11]]),
        "next_confidence": eager["cached_confidence"][:, order],
        "next_anchor": eager["cached_anchor"][:, order] + 1e-6,
        "next_feature": eager["cached_feature"][:, order],
        "next_prev_id": np.array([12]),
    }
    assert 0 < compare_state(2, eager, onnx, 1e-3, 0.05) < 1e-5
    with pytest.raises(ExportCheckError, match="val frame 2: PyTorch keeps instance 4 .* onnxruntime does not"):
        compare_state(2, eager, {**onnx, "next_id": np.array([[5, 7, 11]])}, 1e-3, 0.05)
    with pytest.raises(ExportCheckError, match="onnxruntime has handed out 13 tracking ids, PyTorch 12"):
        compare_state(2, eager, {**onnx, "next_prev_id": np.array([13])}, 1e-3, 0.05)
    with pytest.raises(ExportCheckError, match="kept instances .* differ"):
        compare_state(2, eager, {**onnx, "next_anchor": onnx["next_anchor"] + 0.01}, 1e-3, 0.05)


def test_a_model_without_temporal_instances_is_refused():
    model = build_model(model_settings(**{**STAGE_MODEL, "num_temp_instances": 0}), np.zeros((20, 11), np.float32))
    with pytest.raises(ExportError, match="model.num_temp_instances is 0"):
        InferenceStep(model)
