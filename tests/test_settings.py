"""Every setting is a checked param: the profiles validate, a misspelt or unknown key stops a
stage naming it and its near neighbours, wrong types and ranges are named; the learning rate
scales with the batch as asked; a launch setting keeps the resumable checkpoint."""

from __future__ import annotations

import ast
import math
import pickle

import numpy as np
import pytest
import yaml

from pipeline.params import ParamsError, read_params
from pipeline.settings import CLASSES, LAUNCH_KEYS, SCHEMA, params_problems
from tests.conftest import ROOT, launch_stage

PROFILES = ("params.yaml", "params-full.yaml", "params-performance.yaml")


def demo() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def problems_with(change) -> list[str]:
    params = demo()
    change(params)
    return params_problems(params)


@pytest.mark.parametrize("profile", PROFILES)
def test_every_profile_validates(profile):
    """Also catches a key added to a profile but not to pipeline/settings.py (or the reverse)."""
    read_params(ROOT / profile)


def test_a_misspelt_key_is_named_with_the_keys_nearby(tmp_path):
    params = demo()
    params["train"]["lr_scalling"] = params["train"].pop("lr_scaling")
    params["model"]["num_decoders"] = 6
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ParamsError) as err:
        read_params(tmp_path / "params.yaml")
    message = str(err.value)
    assert "train.lr_scalling: unknown key (did you mean train.lr_scaling" in message
    assert "model.num_decoders: unknown key (did you mean model.num_decoder" in message
    assert "train.lr_scaling: missing" in message
    assert str(tmp_path / "params.yaml") in message


def test_a_misspelt_key_in_another_section_stops_a_stage(tmp_path):
    """The backbone stage reads only `backbone`, yet a typo in `data` stops it before it runs."""
    params = demo()
    params["data"]["aug"]["rand_flpi"] = params["data"]["aug"].pop("rand_flip")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    result = launch_stage("backbone", "--params", "params.yaml", "--out", "ckpt", cwd=tmp_path)
    assert result.returncode != 0
    assert "data.aug.rand_flpi: unknown key (did you mean data.aug.rand_flip" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "ckpt").exists()


def test_an_unknown_key_far_from_any_lists_the_section():
    problems = problems_with(lambda p: p["evaluate"].update(zzz=1))
    assert problems == [
        "evaluate.zzz: unknown key (known keys in evaluate: "
        + ", ".join(f"evaluate.{k}" for k in SCHEMA["evaluate"])
        + ")"
    ]
    assert problems_with(lambda p: p.update(trian={})) == ["trian: unknown key (did you mean train?)"]
    assert problems_with(lambda p: p["train"].update(classes=[])) == [
        "train.classes: unknown key (did you mean synthesize.classes or model.classes?)"
    ]


@pytest.mark.parametrize(
    "section, key, value, message",
    [
        ("train", "lr", "fast", "train.lr: expected a number > 0.0, got 'fast'"),
        ("train", "lr", 0, "train.lr: expected a number > 0.0, got 0"),
        ("train", "lr_scaling", "cubic", "train.lr_scaling: expected one of none, reference, linear, sqrt"),
        ("train", "devices", 2.5, "train.devices: expected an integer >= 1 or one of auto, got 2.5"),
        ("train", "master_port", 70000, "train.master_port: expected an integer in [1, 65534], got 70000"),
        ("train", "loss_scale", "auto", "train.loss_scale: expected a number > 0.0 or one of dynamic"),
        ("data", "skip_prob", 1.5, "data.skip_prob: expected a number in [0.0, 1.0], got 1.5"),
        ("data", "photometric", "yes", "data.photometric: expected true or false, got 'yes'"),
        ("model", "depth", 20, "model.depth: expected one of 18, 34, 50, 101, got 20"),
        ("model", "use_grid_mask", 1, "model.use_grid_mask: expected true or false, got 1"),
        ("model", "classes", ["car", "spaceship"], "model.classes: item 1: expected one of car, truck"),
        ("model", "classes", ["car", "car"], "model.classes: expected a list of at least 1 distinct items"),
        ("convert", "version", "v2.0", "convert.version: expected one of v1.0-trainval, v1.0-test, v1.0-mini"),
        ("backbone", "sha256", "abc", "backbone.sha256: expected empty or a 64-digit hex sha256"),
        ("evaluate", "checkpoint", "", "evaluate.checkpoint: expected a non-empty string"),
    ],
)
def test_wrong_types_and_ranges_are_named(section, key, value, message):
    problems = problems_with(lambda p: p[section].update({key: value}))
    assert len(problems) == 1 and problems[0].startswith(message), problems


def test_nested_values_and_rules_between_settings_are_checked():
    assert problems_with(lambda p: p["data"]["aug"].update(final_dim=[256])) == [
        "data.aug.final_dim: expected a list of 2 items, each an integer >= 1, got 1 items: [256]"
    ]
    assert problems_with(lambda p: p["data"].update(aug=[1, 2])) == ["data.aug: expected a section of keys, got [1, 2]"]
    assert problems_with(lambda p: p["model"].update(num_single_frame_decoder=4)) == [
        "model.num_single_frame_decoder: 4 is more than model.num_decoder"
    ]
    # the node's rank is not a setting: node 0 runs the DVC stage, the others `--node-rank K`
    assert problems_with(lambda p: p["train"].update(node_rank=1)) == [
        "train.node_rank: no longer a setting: node 0 runs `dvc repro`, node K runs `python -m stages.train --node-rank K`"
    ]
    assert problems_with(lambda p: p["evaluate"].update(devices="all")) == [
        "evaluate.devices: expected an integer >= 1 or one of auto, got 'all'"
    ]
    assert problems_with(lambda p: p["train"].update(devices="auto", total_batch_size=3)) == []
    # YAML 1.1 reads `1e-3` (no dot) as a string; the code's float() takes it, so the check does too.
    assert problems_with(lambda p: p["train"].update(lr="1e-3")) == []
    # The number of anchors is the anchors stage's (anchors.num_anchor); the model takes the file's rows.
    assert problems_with(lambda p: p["model"].update(num_anchor=900)) == [
        "model.num_anchor: unknown key (did you mean anchors.num_anchor or model.num_decoder?)"
    ]


def test_launch_keys_are_train_keys():
    assert set(LAUNCH_KEYS) == {"train"} and set(LAUNCH_KEYS["train"]) <= set(SCHEMA["train"])


def test_persistent_workers_need_loader_processes():
    """torch's DataLoader refuses persistent_workers without workers: the params check says so first."""
    assert problems_with(lambda p: p["train"].update(persistent_workers=True)) == [
        "train.persistent_workers: true needs loader processes (train.num_workers > 0)"
    ]
    assert problems_with(lambda p: p["train"].update(persistent_workers=True, num_workers=2, pin_memory=True)) == []


def test_one_place_defines_the_classes_and_versions():
    """No module other than pipeline/settings.py spells out the class list or the version list."""
    found = []
    for path in [*(ROOT / "pipeline").rglob("*.py"), *(ROOT / "model").rglob("*.py"), *(ROOT / "stages").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
                values = {e.value for e in node.elts if isinstance(e, ast.Constant)}
                if {"traffic_cone", "construction_vehicle"} <= values or {"v1.0-mini", "v1.0-trainval"} <= values:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    # CLASSES, VERSIONS and ANNOTATED_VERSIONS, nowhere else
    assert [f.split(":")[0] for f in found] == ["pipeline/settings.py"] * 3, found
    assert len(CLASSES) == 10 and len(set(CLASSES)) == 10


# ---------------------------------------------------------------- learning rate


@pytest.mark.parametrize(
    "rule, batch, factor",
    [
        ("none", 12, 1.0),
        ("reference", 48, 1.0),
        ("reference", 24, 2 / 3),  # x2/3 per halving: 8 -> 4 devices
        ("reference", 12, 4 / 9),  # 8 -> 2 devices
        ("reference", 96, 3 / 2),
        ("linear", 12, 1 / 4),
        ("sqrt", 12, 1 / 2),
    ],
)
def test_lr_scales_with_the_global_batch(rule, batch, factor):
    from pipeline.schedule import scaled_lr

    assert math.isclose(scaled_lr(6e-4, batch, rule), 6e-4 * factor, rel_tol=1e-12)


# ---------------------------------------------------------------- launch vs identity


class Recorder(dict):
    """params that note the dotted name of each setting looked up (sections: their leaves)."""

    def __init__(self, data: dict, seen: set[str], prefix: str = ""):
        super().__init__({k: Recorder(v, seen, f"{prefix}{k}.") if isinstance(v, dict) else v for k, v in data.items()})
        self.seen, self.prefix = seen, prefix

    def _note(self, key: str) -> None:
        if not isinstance(super().get(key), dict):
            self.seen.add(self.prefix + key)

    def __getitem__(self, key: str):
        self._note(key)
        return super().__getitem__(key)

    def get(self, key: str, default=None):
        self._note(key)
        return super().get(key, default)


@pytest.fixture(scope="module")
def tiny_workspace(small_twin):
    """The small twin's root with train infos and 20 anchors, as the training tests use."""
    from pipeline.anchors import kmeans_anchors
    from pipeline.convert import convert

    root = small_twin.parent.parent
    infos = convert(str(small_twin), "v1.0-mini")["train"]
    (root / "data" / "settings").mkdir(parents=True, exist_ok=True)
    with open(root / "data" / "settings" / "train.pkl", "wb") as f:
        pickle.dump(infos, f)
    boxes = np.concatenate([i["gt_boxes"] for i in infos["infos"]])
    np.save(root / "data" / "settings" / "anchors.npy", kmeans_anchors(boxes, 20, 55.0, 0)[0])
    return root


def test_a_launch_setting_resumes_and_a_model_setting_starts_afresh(tiny_workspace, tmp_path, monkeypatch, capsys):
    from pipeline.train import train
    from tests.test_train import tiny_params

    monkeypatch.chdir(tiny_workspace)

    def run(params: dict) -> str:
        out = tmp_path / "run"
        data = tiny_workspace / "data" / "settings"
        train(params, str(data / "train.pkl"), str(data / "anchors.npy"), "ckpt/none.json", str(out),
              str(out / "train.json"), str(out / "live"))  # fmt: skip
        return capsys.readouterr().out

    read: set[str] = set()
    first = run(Recorder(tiny_params(iterations=2, checkpoint_interval=2), read))
    assert "resuming" not in first and "starting afresh" not in first
    # every setting the training run looked up is tracked by the train stage, or is a launch one
    listed = [str(k) for k in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["train"]["params"]]
    launch = {f"train.{k}" for k in LAUNCH_KEYS["train"]}
    untracked = {k for k in read if k not in launch and not any(k == p or k.startswith(p + ".") for p in listed)}
    assert read and not untracked, f"the train stage reads settings dvc.yaml does not list: {sorted(untracked)}"

    launch = dict(num_workers=1, master_port=29999, master_addr="10.0.0.1", checkpoint_interval=1)
    launch.update(max_nonfinite_steps=3, pin_memory=True, persistent_workers=True)
    launch.update(join_timeout=30, max_restarts=1, log_interval=1)
    assert set(launch) == set(LAUNCH_KEYS["train"])
    resumed = run(tiny_params(iterations=2, **launch))
    assert "resuming from" in resumed and "at iteration 2/2" in resumed
    afresh = run(tiny_params(iterations=2, checkpoint_interval=2, lr=1e-3))
    assert "belongs to other settings; starting afresh" in afresh


def test_the_number_of_data_workers_does_not_change_the_trained_weights(tiny_workspace, tmp_path, monkeypatch):
    """Why train.num_workers is a launch setting: each sample is seeded, whichever process loads it
    (the loader's pin_memory and persistent_workers neither change a sample)."""
    import torch

    from pipeline.train import train
    from tests.test_train import tiny_params

    monkeypatch.chdir(tiny_workspace)
    data = tiny_workspace / "data" / "settings"
    weights = []
    for workers in (0, 2):
        out = tmp_path / f"workers{workers}"
        loader = dict(num_workers=workers, pin_memory=workers > 0, persistent_workers=workers > 0)
        train(tiny_params(iterations=2, **loader), str(data / "train.pkl"), str(data / "anchors.npy"),
              "ckpt/none.json", str(out), str(out / "train.json"), str(out / "live"))  # fmt: skip
        weights.append(torch.load(out / "model.pth", weights_only=False)["state_dict"])
    assert weights[0].keys() == weights[1].keys()
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key
