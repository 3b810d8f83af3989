"""DVC stage `backbone`: the ImageNet ResNet-50 weights into ckpt/, with a manifest DVC tracks."""

from __future__ import annotations

import argparse
import os
import sys
import urllib.parse
from pathlib import Path

from pipeline.cli import run_stage, stage_parser
from pipeline.download import DownloadError, fetch
from pipeline.files import write_json_atomic
from pipeline.params import load_params


def run(args: argparse.Namespace) -> None:
    out = Path(args.out)
    p = load_params(args.params, "backbone")
    source = str(p["source"]).strip()
    manifest = {"source": source, "file": None, "sha256": None, "bytes": 0}
    if source.lower() != "none":
        name = Path(urllib.parse.urlparse(source).path).name or "backbone.pth"
        digest = fetch(source, out / name, sha256=p.get("sha256") or None, retries=int(p["retries"]))
        manifest.update(file=name, sha256=digest, bytes=os.path.getsize(out / name))
    # Weights of an earlier source are not left behind to be picked up by mistake.
    for stale in out.glob("*.pth"):
        if stale.name != manifest["file"]:
            stale.unlink()
    write_json_atomic(out / "backbone.json", manifest)
    print(f"backbone: {manifest}")


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser("backbone", __doc__)
    parser.add_argument("--out", default="ckpt", help="folder for the weights and backbone.json")
    args = parser.parse_args(argv)
    return run_stage("backbone", run, args, errors=(DownloadError,))


if __name__ == "__main__":
    sys.exit(main())
