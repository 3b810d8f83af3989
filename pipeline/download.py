"""Fetching a weights file: resumable HTTP(S) download with retries, checksum, atomic rename.

A partial download lives at `<dest>.part` and is resumed with an HTTP Range request; the file
appears at `dest` only after its sha256 matched, so `dest` is never partial or corrupt.
"""

from __future__ import annotations

import http.client
import os
import re
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from tqdm import tqdm

from pipeline.files import CHUNK, sha256_of


class DownloadError(RuntimeError):
    """The source could not be fetched or failed its checksum; the message says which."""


def expected_prefix(name: str) -> str | None:
    """The sha256 prefix that torchvision-style names carry (`resnet50-19c8e357.pth`)."""
    m = re.search(r"-([0-9a-f]{8,64})\.[A-Za-z0-9]+$", name)
    return m.group(1) if m else None


def _check(path: Path, source: str, sha256: str | None) -> str:
    digest = sha256_of(path)
    want = sha256 or expected_prefix(Path(urllib.parse.urlparse(source).path).name)
    if want and not digest.startswith(want.lower()):
        path.unlink(missing_ok=True)
        raise DownloadError(f"{source}: sha256 {digest} does not match the expected {want}; nothing was written")
    return digest


def _http_fetch(url: str, part: Path, retries: int, backoff: float, timeout: float) -> None:
    last: Exception | None = None
    for attempt in range(retries):
        if attempt:
            time.sleep(backoff * 2 ** (attempt - 1))
        start = part.stat().st_size if part.exists() else 0
        headers = {"Range": f"bytes={start}-"} if start else {}
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as resp:
                if start and resp.status != 206:
                    start = 0  # the server ignored the range: start over
                length = resp.headers.get("Content-Length")
                total = start + int(length) if length is not None else None
                with open(part, "ab" if start else "wb") as f, tqdm(
                    total=total, initial=start, unit="B", unit_scale=True, desc=f"download {Path(url).name}"
                ) as bar:
                    for block in iter(lambda: resp.read(CHUNK), b""):
                        f.write(block)
                        bar.update(len(block))
            size = part.stat().st_size
            if total is not None and size < total:
                raise http.client.IncompleteRead(b"", total - size)
            return
        except urllib.error.HTTPError as err:
            if err.code == 416 and start:
                return  # range beyond the end: the part file is already complete
            last = err
            if 400 <= err.code < 500 and err.code not in (408, 429):
                break  # not found, forbidden...: retrying will not help
        except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
            last = err
    raise DownloadError(f"{url}: download failed after {retries} attempt(s): {last}")


def fetch(
    source: str,
    dest: str | os.PathLike,
    sha256: str | None = None,
    retries: int = 5,
    backoff: float = 1.0,
    timeout: float = 60.0,
) -> str:
    """Put `source` (https/http URL, file:// URL or local path) at `dest`; returns its sha256.

    sha256: the full expected digest; when empty, the hash prefix in the file name (if any) is
    checked, as torch.hub does.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    parsed = urllib.parse.urlparse(source)
    if parsed.scheme in ("http", "https"):
        _http_fetch(source, part, retries, backoff, timeout)
    else:
        local = Path(urllib.request.url2pathname(parsed.path)) if parsed.scheme == "file" else Path(source)
        if not local.is_file():
            raise DownloadError(f"{source}: no such file")
        shutil.copyfile(local, part)
    digest = _check(part, source, sha256)
    os.replace(part, dest)
    return digest
