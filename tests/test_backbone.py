"""Backbone weights download: resume, checksum, retries, sources, manifest."""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.download import DownloadError, fetch
from tests.conftest import ROOT, launch_stage

PAYLOAD = np.random.default_rng(0).integers(0, 256, 3 * (1 << 20) + 12345, dtype=np.uint8).tobytes()
DIGEST = hashlib.sha256(PAYLOAD).hexdigest()


class Server:
    """A loopback HTTP server for one file, with Range support and a mid-file drop on demand."""

    def __init__(self):
        self.drop_first = 0  # this many requests are cut after half the bytes
        self.requests: list[str | None] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.requests.append(self.headers.get("Range"))
                start = 0
                if self.headers.get("Range"):
                    start = int(self.headers["Range"].split("=")[1].split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}")
                else:
                    self.send_response(200)
                body = PAYLOAD[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if server.drop_first > 0:
                    server.drop_first -= 1
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/weights-{DIGEST[:8]}.pth"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


def test_download_and_full_checksum(server, tmp_path):
    dest = tmp_path / "w.pth"
    assert fetch(server.url, dest, sha256=DIGEST, backoff=0.01) == DIGEST
    assert dest.read_bytes() == PAYLOAD and not (tmp_path / "w.pth.part").exists()


def test_dropped_connection_resumes_with_range(server, tmp_path):
    server.drop_first = 1
    dest = tmp_path / "w.pth"
    fetch(server.url, dest, backoff=0.01)  # the name's sha256 prefix is checked
    assert dest.read_bytes() == PAYLOAD
    assert server.requests[0] is None and server.requests[1].startswith("bytes=") and server.requests[1] != "bytes=0-"


def test_wrong_checksum_leaves_nothing(server, tmp_path):
    dest = tmp_path / "w.pth"
    with pytest.raises(DownloadError, match="sha256"):
        fetch(server.url, dest, sha256="0" * 64, backoff=0.01)
    assert list(tmp_path.iterdir()) == []


def test_unreachable_host_fails_after_retries(tmp_path):
    with socket.socket() as s:  # a loopback port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DownloadError, match=r"after 3 attempt"):
        fetch(f"http://127.0.0.1:{port}/x.pth", tmp_path / "x.pth", retries=3, backoff=0.01, timeout=2)
    assert list(tmp_path.iterdir()) == []


def test_file_url_and_local_path(tmp_path):
    src = tmp_path / "mirror" / f"weights-{DIGEST[:8]}.pth"
    src.parent.mkdir()
    src.write_bytes(PAYLOAD)
    assert fetch(src.as_uri(), tmp_path / "a.pth") == DIGEST
    assert fetch(str(src), tmp_path / "b.pth") == DIGEST
    with pytest.raises(DownloadError, match="no such file"):
        fetch(str(tmp_path / "missing.pth"), tmp_path / "c.pth")


def run_stage(tmp_path: Path, source: str) -> subprocess.CompletedProcess:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["backbone"].update(source=source, retries=2)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return launch_stage("backbone", "--params", "params.yaml", "--out", "ckpt", cwd=tmp_path)


def test_stage_manifest_for_a_source_and_for_none(server, tmp_path):
    result = run_stage(tmp_path, server.url)
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "ckpt" / "backbone.json").read_text())
    assert manifest == {"source": server.url, "file": Path(server.url).name, "sha256": DIGEST, "bytes": len(PAYLOAD)}
    result = run_stage(tmp_path, "none")
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "ckpt" / "backbone.json").read_text())["file"] is None
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["backbone.json"]


def test_stage_bad_source_is_a_clear_error(tmp_path):
    result = run_stage(tmp_path, str(tmp_path / "nowhere.pth"))
    assert result.returncode != 0 and "nowhere.pth" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "ckpt" / "backbone.json").exists()
