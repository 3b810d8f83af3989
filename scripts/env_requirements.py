"""What an active (user's) environment lacks of requirements/*.txt, for scripts/setup.sh.

An Ascend user's conda env already has torch 2.1 + torch_npu, a DrivingSDK-patched mmcv-full and
its own numpy (often 1.2x); `pip install -r requirements/base.txt` would replace some of them. This
keeps every installed distribution whose version is compatible (the pin, or the range in
COMPATIBLE) and lists only the requirements to install: the missing and the incompatible ones.

    python scripts/env_requirements.py --constraints FILE requirements/base.txt ...

prints one line per requirement to install, `name==version<TAB>why` (why: `missing` or
`replaces <installed version>`), and writes to FILE the constraints that keep everything else as
it is while pip adds those: `name==installed version` for every kept requirement and for the
PROTECTED distributions that are installed (torch, torch_npu, mmcv, numpy, ...). A dependency that
would need another version of one of them makes pip fail instead of replacing it.

Standard library and `packaging` only (pip's vendored copy when packaging is not installed), so it
runs on the environment's own Python (3.9+) before anything is installed.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

try:
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet
    from packaging.utils import canonicalize_name
    from packaging.version import InvalidVersion, Version
except ImportError:  # pip vendors packaging; an environment need not have it installed
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.specifiers import SpecifierSet
    from pip._vendor.packaging.utils import canonicalize_name
    from pip._vendor.packaging.version import InvalidVersion, Version

# An installed version in these ranges is kept in place of the pin. numpy: an Ascend env's own
# numpy (torch 2.1 + torch_npu + CANN; often 1.2x) is never replaced by 1.26.4; numpy 2 is not
# compatible (nuscenes-devkit 1.2.0 and opencv-python-headless 4.11 need numpy < 2). Note that the
# pins' own floors still apply through pip: nuscenes-devkit 1.2.0 needs numpy >= 1.22; for Python
# < 3.11 pandas 2.3.3 and scipy 1.13.1 need >= 1.22.4 and matplotlib 3.9.4 >= 1.23 (with the numpy
# pinned as a constraint pip then fails and says which).
COMPATIBLE = {"numpy": ">=1.21,<2"}

# Installed distributions that pip must never replace while it adds what is missing (pinned to
# their installed versions in the constraints), unless this module itself decided to replace one.
PROTECTED = ("torch", "torchvision", "torch-npu", "mmcv", "mmcv-full", "mx-driving", "numpy")


def read_requirements(paths: Iterable[str | Path], environment: Mapping[str, str] | None = None) -> list[Requirement]:
    """The requirements of pip requirement files that apply to `environment` (marker variables;
    default: this interpreter). Comments, blank lines and option lines (-r, -c, --...) are skipped."""
    out = []
    for path in paths:
        for line in Path(path).read_text().splitlines():
            line = re.sub(r"(^|\s)#.*", "", line).strip()
            if not line or line.startswith("-"):
                continue
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate(dict(environment) if environment else None):
                out.append(req)
    return out


def installed_distributions() -> dict[str, str]:
    """{canonical name: version} of the distributions installed for this interpreter."""
    found = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            found.setdefault(canonicalize_name(name), dist.version)
    return found


def _version(text: str) -> Version | None:
    try:
        return Version(text)
    except InvalidVersion:
        return None


def plan(
    requirements: Iterable[Requirement],
    installed: Mapping[str, str],
    compatible: Mapping[str, str] = COMPATIBLE,
    protected: Iterable[str] = PROTECTED,
) -> tuple[list[tuple[str, str]], list[str]]:
    """(to install, constraints). To install: (`name==version`, why) for every requirement that is
    missing or installed at a version outside its compatible range (`compatible[name]`, else the
    requirement's own specifier). Constraints: `name==installed` for every kept requirement and every
    installed `protected` distribution that is not to be installed."""
    installed = {canonicalize_name(k): v for k, v in installed.items()}
    compatible = {canonicalize_name(k): SpecifierSet(v) for k, v in compatible.items()}
    add, adding, keep = [], set(), {}
    for req in requirements:
        name = canonicalize_name(req.name)
        have = installed.get(name)
        allowed = compatible.get(name, req.specifier)
        version = _version(have) if have is not None else None
        if version is not None and allowed.contains(version, prereleases=True):
            keep[name] = have
        elif name not in adding:
            adding.add(name)
            add.append((f"{req.name}{req.specifier}", "missing" if have is None else f"replaces {have}"))
    for name in (canonicalize_name(p) for p in protected):
        if name in installed and name not in adding:
            keep.setdefault(name, installed[name])
    constraints = [f"{name}=={version}" for name, version in sorted(keep.items()) if _version(version) is not None]
    return add, constraints


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", help="pip requirement files")
    parser.add_argument("--constraints", required=True, help="where to write the constraints for pip install -c")
    args = parser.parse_args(argv)
    add, constraints = plan(read_requirements(args.files), installed_distributions())
    Path(args.constraints).write_text("".join(f"{c}\n" for c in constraints))
    for requirement, why in add:
        print(f"{requirement}\t{why}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
