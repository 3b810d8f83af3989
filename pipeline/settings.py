"""Every setting of params.yaml, with its type and range: the one schema the stages check.

Each stage validates the whole params file before it reads its section (`check_params`, called
by `pipeline.params.load_params`), so a misspelt or unknown key anywhere is an error that names
it (as a dotted path) and the known keys nearby, instead of a silently ignored setting; a
missing key, a wrong type or a value out of range is named the same way.

Also here, because several modules use them: the detection classes and the nuScenes versions,
and which `train` settings only say how a run is launched (`LAUNCH_KEYS`).
"""

from __future__ import annotations

import difflib
import math
from typing import Any

# The 10 nuScenes detection classes in Sparse4D's order (the label index is the position).
CLASSES = (
    "car",
    "truck",
    "construction_vehicle",
    "bus",
    "trailer",
    "barrier",
    "motorcycle",
    "bicycle",
    "pedestrian",
    "traffic_cone",
)
# nuScenes releases; the synthetic twin writes the annotated ones (a test split has no boxes).
VERSIONS = ("v1.0-trainval", "v1.0-test", "v1.0-mini")
ANNOTATED_VERSIONS = ("v1.0-mini", "v1.0-trainval")
# Each version's scene splits as the devkit names them (nuscenes.utils.splits): (train, val);
# v1.0-test has no val split.
SPLITS = {"v1.0-trainval": ("train", "val"), "v1.0-test": ("test", ""), "v1.0-mini": ("mini_train", "mini_val")}

# The reference's global batch (6 per device x 8 devices), at which its lr 6e-4 was tuned.
REFERENCE_BATCH = 48
LR_SCALING = ("none", "reference", "linear", "sqrt")

# `train` settings that say how a run is launched, not what it computes: changing them neither
# invalidates the train stage's outputs (dvc.yaml lists every other train key) nor the resumable
# checkpoint (pipeline.train fingerprints every other key). The data loader seeds each item, so
# the number of workers does not change a sample, nor does pinning the batches' memory or keeping
# the workers alive; a checkpoint's timing does not change a step;
# the non-finite guard only decides when a failing run stops. The device, the number of devices
# and nodes (the per-device batch and how the sampler splits the data) and the precision change
# the maths and are not here.
LAUNCH_KEYS = {
    "train": (
        "master_addr",
        "master_port",
        "join_timeout",
        "max_restarts",
        "checkpoint_interval",
        "log_interval",
        "max_nonfinite_steps",
        "num_workers",
        "pin_memory",
        "persistent_workers",
    )
}


class Spec:
    """One setting: `problem(value)` says what is wrong with a value, or None."""

    expected = "a value"

    def problem(self, value: Any) -> str | None:
        return None if self.accepts(value) else f"expected {self.expected}, got {value!r}"

    def accepts(self, value: Any) -> bool:
        raise NotImplementedError


def _bounds(lo: float | None, hi: float | None) -> str:
    if lo is not None and hi is not None:
        return f" in [{lo}, {hi}]"
    if lo is not None:
        return f" >= {lo}"
    return f" <= {hi}" if hi is not None else ""


class Int(Spec):
    def __init__(self, lo: int | None = None, hi: int | None = None):
        self.lo, self.hi = lo, hi
        self.expected = "an integer" + _bounds(lo, hi)

    def accepts(self, value: Any) -> bool:
        return (
            isinstance(value, int)
            and not isinstance(value, bool)
            and (self.lo is None or value >= self.lo)
            and (self.hi is None or value <= self.hi)
        )


class Float(Spec):
    """A number; a string such as '1e-3' counts (YAML 1.1 reads an exponent without a dot as text)."""

    def __init__(self, lo: float | None = None, hi: float | None = None, lo_open: bool = False):
        self.lo, self.hi, self.lo_open = lo, hi, lo_open
        self.expected = "a number" + (f" > {lo}" if lo_open and hi is None else _bounds(lo, hi))
        if lo_open and hi is not None:
            self.expected = f"a number in ({lo}, {hi}]"

    def accepts(self, value: Any) -> bool:
        if isinstance(value, bool):
            return False
        try:
            x = float(value)
        except (TypeError, ValueError):
            return False
        if not math.isfinite(x):
            return False
        if self.lo is not None and (x <= self.lo if self.lo_open else x < self.lo):
            return False
        return self.hi is None or x <= self.hi


class Bool(Spec):
    expected = "true or false"

    def accepts(self, value: Any) -> bool:
        return isinstance(value, bool)


class Str(Spec):
    def __init__(self, empty: bool = False):
        self.empty = empty
        self.expected = "a string" if empty else "a non-empty string"

    def accepts(self, value: Any) -> bool:
        return isinstance(value, str) and (self.empty or bool(value.strip()))


class Choice(Spec):
    def __init__(self, *options: Any):
        self.options = options
        self.expected = "one of " + ", ".join(map(str, options))

    def accepts(self, value: Any) -> bool:
        return not isinstance(value, bool) and value in self.options


class Either(Spec):
    def __init__(self, *specs: Spec):
        self.specs = specs
        self.expected = " or ".join(s.expected for s in specs)

    def accepts(self, value: Any) -> bool:
        return any(s.accepts(value) for s in self.specs)


class Sha256(Spec):
    expected = "empty or a 64-digit hex sha256"

    def accepts(self, value: Any) -> bool:
        return isinstance(value, str) and (
            value == "" or (len(value) == 64 and all(c in "0123456789abcdefABCDEF" for c in value))
        )


class List(Spec):
    """A list of `item`s: exactly `length` of them, or at least `min_len`; `unique` forbids repeats."""

    def __init__(self, item: Spec, length: int | None = None, min_len: int = 0, unique: bool = False):
        self.item, self.length, self.min_len, self.unique = item, length, min_len, unique
        size = f"{length} " if length else (f"at least {min_len} " if min_len else "")
        self.expected = f"a list of {size}{'distinct ' if unique else ''}items, each {item.expected}"

    def problem(self, value: Any) -> str | None:
        if not isinstance(value, list):
            return f"expected {self.expected}, got {value!r}"
        if (self.length is not None and len(value) != self.length) or len(value) < self.min_len:
            return f"expected {self.expected}, got {len(value)} items: {value!r}"
        for i, item in enumerate(value):
            problem = self.item.problem(item)
            if problem:
                return f"item {i}: {problem}"
        if self.unique and len(set(map(str, value))) != len(value):
            return f"expected {self.expected}, got repeats: {value!r}"
        return None


def _range(item: Spec) -> List:
    """A [low, high] pair."""
    return List(item, length=2)


DEVICE = Choice("auto", "npu", "cuda", "cpu")
# processes per node: a number, or auto (every visible device of the type; one process on the CPU)
DEVICES = Either(Int(1), Choice("auto"))
PROBABILITY = Float(0.0, 1.0)

# Every key of params.yaml. A nested dict is a section; every key is required.
SCHEMA: dict[str, Any] = {
    "synthesize": {
        "version": Choice(*ANNOTATED_VERSIONS),
        "seed": Int(0),
        "num_scenes": Int(1),
        "samples_per_scene": Int(2),
        "objects_per_scene": Int(0),
        "image_width": Int(1),
        "image_height": Int(1),
        "jpeg_quality": Int(1, 100),
        "sweeps_per_sample": Int(0, 9),
        "lidar_azimuth_steps": Int(36),
        "classes": List(Choice(*CLASSES), min_len=1, unique=True),
    },
    "convert": {
        "data_root": Str(),
        "version": Choice(*VERSIONS),
        "max_sweeps": Int(0),
    },
    "anchors": {
        "num_anchor": Int(1),
        "detection_range": Float(0.0, lo_open=True),
        "seed": Int(0),
        "n_init": Int(1),
    },
    "backbone": {
        "source": Str(),
        "sha256": Sha256(),
        "retries": Int(0),
    },
    "model": {
        "depth": Choice(18, 34, 50, 101),
        "with_cp": Bool(),
        "embed_dims": Int(1),
        "num_groups": Int(1),
        "num_decoder": Int(1),
        "num_single_frame_decoder": Int(0),
        "num_temp_instances": Int(0),
        "num_dn_groups": Int(0),
        "num_temp_dn_groups": Int(0),
        "max_dn_gt": Int(0),
        "num_depth_layers": Int(0),
        "depth_loss_weight": Float(0.0),
        "num_levels": Int(1, 4),
        "num_cams": Int(1),
        "num_learnable_pts": Int(0),
        "confidence_decay": Float(0.0, 1.0),
        "dropout": Float(0.0, 1.0),
        "attn_drop": Float(0.0, 0.99),
        "num_output": Int(1),
        "use_grid_mask": Bool(),
        "correct_projected_yaw": Bool(),
        "sort_cls_scores": Bool(),
        "classes": List(Choice(*CLASSES), min_len=1, unique=True),
        # The reference's loss_cls, loss_reg and head reg_weights; per-dimension weights are over the
        # encoded box x, y, z, log l, log w, log h, sin yaw, cos yaw, vx, vy.
        "loss": {
            "cls_weight": Float(0.0),
            "focal_gamma": Float(0.0),
            "focal_alpha": Float(0.0, 1.0),
            "box_weight": Float(0.0),
            "reg_weights": List(Float(0.0), length=10),
            "cls_threshold_to_reg": Float(0.0, 1.0),
            # The centerness target exp(-|box_target - box|) without its gradient to the box, as the Ascend
            # port's mmdet.patch trains; false: the reference.
            "detach_centerness_target": Bool(),
        },
        # The reference's sampler: the Hungarian matching cost and the denoising noise.
        "matching": {
            "cls_weight": Float(0.0),
            "box_weight": Float(0.0),
            "reg_weights": List(Float(0.0), length=10),
            "cone_reg_weights": List(Float(0.0), length=10),
            "dn_noise_scale": List(Float(0.0), length=10),
        },
    },
    "data": {
        "aug": {
            "H": Int(1),
            "W": Int(1),
            "final_dim": List(Int(1), length=2),
            "resize_lim": _range(Float(0.0, lo_open=True)),
            "bot_pct_lim": _range(Float(0.0, 1.0)),
            "rot_lim": _range(Float(-180.0, 180.0)),
            "rand_flip": Bool(),
            "rot3d_range": _range(Float(-math.pi, math.pi)),
        },
        "photometric": Bool(),
        "sequences_split_num": Int(1),
        "skip_prob": PROBABILITY,
        "sequence_flip_prob": PROBABILITY,
        "use_valid_flag": Bool(),
        "fast_images": Bool(),
    },
    "train": {
        "device": DEVICE,
        "devices": DEVICES,
        "nnodes": Int(1),
        "master_addr": Str(),
        "master_port": Int(1, 65534),  # and the next port
        "join_timeout": Int(1),  # seconds
        "max_restarts": Int(0),
        "total_batch_size": Int(1),
        "iterations": Int(0),
        "epochs": Float(0.0, lo_open=True),
        "lr": Float(0.0, lo_open=True),
        "lr_scaling": Choice(*LR_SCALING),
        "backbone_lr_mult": Float(0.0),
        "weight_decay": Float(0.0),
        "grad_clip": Float(0.0, lo_open=True),
        "warmup_iters": Int(0),
        "warmup_ratio": Float(0.0, 1.0),
        "min_lr_ratio": Float(0.0, 1.0),
        "precision": Choice("auto", "fp32", "fp16", "bf16"),
        "loss_scale": Either(Float(0.0, lo_open=True), Choice("dynamic")),
        "checkpoint_interval": Int(1),
        "log_interval": Int(1),  # iterations between the lines of runs/train/train.log
        "eval_interval": Int(0),  # iterations between validations on the val split; 0: none
        "max_nonfinite_steps": Int(1),
        "num_workers": Int(0),
        "pin_memory": Bool(),  # page-locked batches for the copy to the accelerator (the Ascend port)
        "persistent_workers": Bool(),  # keep the loader processes alive (the Ascend port); needs num_workers > 0
        "seed": Int(0),
    },
    "evaluate": {
        "device": DEVICE,
        "devices": DEVICES,
        "checkpoint": Str(),
        "precision": Choice("auto", "fp32", "fp16", "bf16"),
        "fuse_conv_bn": Bool(),
        "tracking_threshold": PROBABILITY,
        "draw_frames": Int(0),
        "draw_score_threshold": PROBABILITY,
    },
    "export": {
        "opset": Int(16),  # GridSample needs 16; 17 has LayerNormalization
        "check_frames": Int(0),  # first val frames checked in onnxruntime against PyTorch; 0: all
        "tolerance": Float(0.0, lo_open=True),
        "min_score": PROBABILITY,  # detections and kept instances checked from this score up
    },
}


def _known(schema: dict[str, Any], prefix: str = "") -> list[str]:
    """Every dotted key of a schema, sections included."""
    keys = []
    for name, spec in schema.items():
        keys.append(prefix + name)
        if isinstance(spec, dict):
            keys += _known(spec, f"{prefix}{name}.")
    return keys


KNOWN_KEYS = tuple(_known(SCHEMA))


# Keys earlier versions had, with what replaced them.
RETIRED = {
    "train.node_rank": "no longer a setting: node 0 runs `dvc repro`, node K runs `python -m stages.train --node-rank K`",
}


def _unknown(dotted: str, section: dict[str, Any], prefix: str) -> str:
    """The message for an unknown key: the same name in another section (a key put under the wrong
    one) and its close matches in its own section, else the section's keys."""
    if dotted in RETIRED:
        return f"{dotted}: {RETIRED[dotted]}"
    leaf = dotted.rsplit(".", 1)[-1]
    elsewhere = [k for k in KNOWN_KEYS if k.rsplit(".", 1)[-1] == leaf]
    near = elsewhere + [prefix + k for k in difflib.get_close_matches(leaf, list(section), n=3, cutoff=0.6)]
    if near:
        return f"{dotted}: unknown key (did you mean {' or '.join(near)}?)"
    known = ", ".join(prefix + k for k in section)
    return f"{dotted}: unknown key (known keys {'in ' + prefix[:-1] if prefix else 'at the top'}: {known})"


def _check(data: Any, schema: dict[str, Any], where: str, errors: list[str]) -> None:
    prefix = f"{where}." if where else ""
    if not isinstance(data, dict):
        errors.append(f"{where}: expected a section of keys, got {data!r}")
        return
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        spec = schema.get(key) if isinstance(key, str) else None
        if spec is None:
            errors.append(_unknown(dotted, schema, prefix))
        elif isinstance(spec, dict):
            _check(value, spec, dotted, errors)
        else:
            problem = spec.problem(value)
            if problem:
                errors.append(f"{dotted}: {problem}")
    for key in schema:
        if key not in data:
            errors.append(f"{prefix}{key}: missing")


def _consistency(data: dict[str, Any], errors: list[str]) -> None:
    """Rules between settings that the single-key specs cannot state."""
    model, train = data.get("model", {}), data.get("train", {})
    if isinstance(model, dict) and isinstance(model.get("num_decoder"), int):
        single = model.get("num_single_frame_decoder")
        if isinstance(single, int) and single > model["num_decoder"]:
            errors.append(f"model.num_single_frame_decoder: {single} is more than model.num_decoder")
        dims, groups = model.get("embed_dims"), model.get("num_groups")
        if isinstance(dims, int) and isinstance(groups, int) and groups > 0 and dims % groups:
            errors.append(f"model.embed_dims: {dims} is not divisible by model.num_groups {groups}")
    if isinstance(train, dict):
        nodes = train.get("nnodes")
        if train.get("persistent_workers") is True and train.get("num_workers") == 0:
            errors.append("train.persistent_workers: true needs loader processes (train.num_workers > 0)")
        batch, devices = train.get("total_batch_size"), train.get("devices")
        if isinstance(batch, int) and isinstance(devices, int) and isinstance(nodes, int) and batch % (devices * nodes):
            errors.append(
                f"train.total_batch_size: {batch} is not divisible by {devices * nodes} devices "
                "(train.devices x train.nnodes)"
            )


def params_problems(data: Any) -> list[str]:
    """What is wrong with a parsed params file, one line each (empty when it is valid)."""
    errors: list[str] = []
    _check(data, SCHEMA, "", errors)
    if not errors:
        _consistency(data, errors)
    return errors


def identity_params(params: dict[str, Any]) -> dict[str, Any]:
    """params without the launch settings (LAUNCH_KEYS): what decides a trained model."""
    return {
        name: {k: v for k, v in section.items() if k not in LAUNCH_KEYS.get(name, ())}
        if isinstance(section, dict)
        else section
        for name, section in params.items()
    }
