"""mrcnn.pretrained: the registry and the checked download, against a local HTTP server only
(127.0.0.1; nothing else is ever contacted)."""

import hashlib
import http.server
import os
import socket
import subprocess
import sys
import threading
import urllib.parse

import pytest

from mrcnn import pretrained
from mrcnn.pretrained import Source, WeightsUnavailableError

PAYLOAD = os.urandom(5000)
SHA256 = hashlib.sha256(PAYLOAD).hexdigest()
MD5 = hashlib.md5(PAYLOAD).hexdigest()


class _Handler(http.server.BaseHTTPRequestHandler):
    files = {}       # path -> bytes
    truncated = {}   # path -> (bytes, Content-Length announced)
    requests = []

    def do_GET(self):
        self.requests.append(self.path)
        if self.path in self.files:
            body = self.files[self.path]
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif self.path in self.truncated:
            body, announced = self.truncated[self.path]
            self.send_response(200)
            self.send_header("Content-Length", str(announced))
            self.end_headers()
            self.wfile.write(body)
            self.wfile.flush()
            self.close_connection = True
        else:
            self.send_error(404)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    _Handler.files, _Handler.truncated, _Handler.requests = {}, {}, []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield httpd, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(autouse=True)
def _no_mirror(monkeypatch):
    monkeypatch.delenv(pretrained.MIRROR_ENV, raising=False)


def make_source(url, file_hash=SHA256, algorithm="sha256", size=len(PAYLOAD), prefix=False, name="test"):
    return Source(name=name, url=url, filename=url.rsplit("/", 1)[1], hash_algorithm=algorithm,
                  file_hash=file_hash, size=size, license="MIT", preset=None, scope="backbone",
                  format="test", description="test file", hash_prefix=prefix)


def closed_port_url(filename):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: the connection is refused
    return f"http://127.0.0.1:{port}/w/{filename}"


def test_good_download_is_cached_and_reused(server, tmp_path):
    _, base = server
    _Handler.files["/w/good.bin"] = PAYLOAD
    src = make_source(base + "/w/good.bin")
    path = pretrained.fetch(src, cache_dir=str(tmp_path), progress=False)
    assert path == str(tmp_path / "good.bin") == pretrained.path_for(src, cache_dir=str(tmp_path))
    assert open(path, "rb").read() == PAYLOAD
    assert sorted(os.listdir(tmp_path)) == ["good.bin", "good.bin.verified"]
    assert _Handler.requests == ["/w/good.bin"]
    assert pretrained.fetch(src, cache_dir=str(tmp_path), progress=False) == path
    assert _Handler.requests == ["/w/good.bin"]  # the second call made no request


def test_stamp_avoids_rehashing_and_notices_changes(server, tmp_path, monkeypatch):
    _, base = server
    _Handler.files["/w/s.bin"] = PAYLOAD
    src = make_source(base + "/w/s.bin")
    path = pretrained.fetch(src, cache_dir=str(tmp_path), progress=False)
    calls = []
    real = pretrained._hash_file
    monkeypatch.setattr(pretrained, "_hash_file", lambda *a: calls.append(a) or real(*a))
    pretrained.fetch(src, cache_dir=str(tmp_path), progress=False)
    assert calls == []  # trusted the .verified stamp
    with open(path, "r+b") as f:  # same size, new mtime: hashed again (and found bad, re-downloaded)
        f.write(b"\0" * 10)
    os.utime(path, ns=(1, 1))
    assert open(pretrained.fetch(src, cache_dir=str(tmp_path), progress=False), "rb").read() == PAYLOAD
    assert len(calls) == 1 and len(_Handler.requests) == 2


def test_wrong_hash_is_refused_and_nothing_left(server, tmp_path):
    _, base = server
    _Handler.files["/w/bad.bin"] = PAYLOAD
    expected = "0" * 64
    src = make_source(base + "/w/bad.bin", file_hash=expected)
    with pytest.raises(WeightsUnavailableError) as e:
        pretrained.fetch(src, cache_dir=str(tmp_path), progress=False)
    msg = str(e.value)
    assert base + "/w/bad.bin" in msg and "hash mismatch" in msg
    assert expected in msg and SHA256 in msg and str(tmp_path / "bad.bin") in msg
    assert os.listdir(tmp_path) == []


def test_wrong_size_is_refused(server, tmp_path):
    _, base = server
    _Handler.files["/w/size.bin"] = PAYLOAD
    with pytest.raises(WeightsUnavailableError, match="wrong size: expected 6000 bytes, got 5000"):
        pretrained.fetch(make_source(base + "/w/size.bin", size=6000), cache_dir=str(tmp_path), progress=False)
    assert os.listdir(tmp_path) == []


def test_truncated_download_is_refused_and_nothing_left(server, tmp_path):
    _, base = server
    _Handler.truncated["/w/cut.bin"] = (PAYLOAD[:1000], len(PAYLOAD))
    src = make_source(base + "/w/cut.bin", file_hash=None, size=None)  # only the length can tell
    with pytest.raises(WeightsUnavailableError, match="truncated: 1000 of 5000 bytes") as e:
        pretrained.fetch(src, cache_dir=str(tmp_path), progress=False)
    assert base + "/w/cut.bin" in str(e.value)
    assert os.listdir(tmp_path) == []


def test_interrupted_download_leaves_nothing(server, tmp_path, monkeypatch):
    _, base = server
    _Handler.files["/w/int.bin"] = PAYLOAD

    def interrupt(*args):  # Ctrl-C after the body arrived, before the checks
        raise KeyboardInterrupt

    monkeypatch.setattr(pretrained, "_problem", interrupt)
    with pytest.raises(KeyboardInterrupt):
        pretrained.fetch(make_source(base + "/w/int.bin"), cache_dir=str(tmp_path), progress=False)
    assert os.listdir(tmp_path) == []


def test_http_404(server, tmp_path):
    _, base = server
    with pytest.raises(WeightsUnavailableError) as e:
        pretrained.fetch(make_source(base + "/w/missing.bin"), cache_dir=str(tmp_path), progress=False)
    assert base + "/w/missing.bin" in str(e.value) and "HTTP 404" in str(e.value)
    assert os.listdir(tmp_path) == []


def test_refused_connection_names_url_and_copy_path(tmp_path):
    url = closed_port_url("offline.bin")
    with pytest.raises(WeightsUnavailableError) as e:
        pretrained.fetch(make_source(url), cache_dir=str(tmp_path), progress=False)
    msg = str(e.value)
    assert isinstance(e.value, OSError)
    assert url in msg and "refused" in msg.lower()
    assert f"copy it to {tmp_path / 'offline.bin'} (its sha256 {SHA256} is checked)" in msg


def test_hand_copied_file_used_offline_or_refused(tmp_path):
    url = closed_port_url("copied.bin")
    (tmp_path / "copied.bin").write_bytes(PAYLOAD)
    src = make_source(url, file_hash=MD5, algorithm="md5")
    assert pretrained.fetch(src, cache_dir=str(tmp_path), progress=False) == str(tmp_path / "copied.bin")

    (tmp_path / "copied.bin").write_bytes(PAYLOAD[::-1])  # same size, other content
    with pytest.raises(WeightsUnavailableError) as e:
        pretrained.fetch(src, cache_dir=str(tmp_path), progress=False)
    msg = str(e.value)
    assert "was refused: hash mismatch" in msg and MD5 in msg and url in msg
    assert str(tmp_path / "copied.bin") in msg


def test_torchvision_style_hash_prefix(server, tmp_path):
    _, base = server
    _Handler.files["/w/model-x.pth"] = PAYLOAD
    src = make_source(base + "/w/model-x.pth", file_hash=SHA256[:8], prefix=True)
    assert os.path.isfile(pretrained.fetch(src, cache_dir=str(tmp_path), progress=False))
    bad = make_source(base + "/w/model-x.pth", file_hash="%08x" % (int(SHA256[:8], 16) ^ 1), prefix=True)
    with pytest.raises(WeightsUnavailableError, match="hash mismatch"):
        pretrained.fetch(bad, cache_dir=str(tmp_path / "other"), progress=False)


def test_mirror_env_redirects_downloads(server, tmp_path, monkeypatch):
    _, base = server
    _Handler.files["/mirror/m.bin"] = PAYLOAD
    src = make_source("https://weights.invalid/some/deep/path/m.bin")  # never contacted
    monkeypatch.setenv(pretrained.MIRROR_ENV, base + "/mirror/")
    assert pretrained.url_for(src) == base + "/mirror/m.bin"
    pretrained.fetch(src, cache_dir=str(tmp_path), progress=False)
    assert _Handler.requests == ["/mirror/m.bin"]


def test_default_cache_dir_is_keras(monkeypatch, tmp_path):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "kh"))
    assert pretrained.path_for("coco") == str(tmp_path / "kh" / "models" / "mask_rcnn_coco.h5")
    monkeypatch.delenv("KERAS_HOME")
    home = os.path.expanduser("~")
    if os.access(home, os.W_OK):
        assert pretrained.default_cache_dir() == os.path.join(home, ".keras", "models")


def test_registry_is_well_formed():
    assert {"imagenet-resnet50", "imagenet-resnet101", "coco", "torchvision", "torchvision-v2"} <= set(
        pretrained.SOURCES)
    for name, s in pretrained.SOURCES.items():
        assert s.name == name
        assert s.url.startswith("https://") and urllib.parse.urlsplit(s.url).netloc
        assert s.url.endswith("/" + s.filename)
        assert s.file_hash is not None and set(s.file_hash) <= set("0123456789abcdef")
        want = {"md5": 32, "sha256": 64}[s.hash_algorithm]
        assert len(s.file_hash) == (8 if s.hash_prefix else want)
        assert s.size is None or s.size > 1_000_000
        assert s.license and s.description and s.format
        assert s.scope in ("backbone", "all") and (s.preset is None) == (s.scope == "backbone")
    for name in ("torchvision", "torchvision-v2"):  # torch.hub's file-name prefix is the sha256's
        s = pretrained.SOURCES[name]
        assert s.filename.rsplit("-", 1)[1].split(".")[0] == s.file_hash[:8]


def test_register_source_and_validation():
    src = make_source("https://models.example/acme.h5", name="acme-test")
    try:
        pretrained.register_source(src)
        assert pretrained.get_source("acme-test") is src
        with pytest.raises(ValueError, match="already registered"):
            pretrained.register_source(src)
    finally:
        pretrained.SOURCES.pop("acme-test", None)
    with pytest.raises(ValueError, match="unknown pretrained weights"):
        pretrained.fetch("no-such-weights")
    with pytest.raises(ValueError):
        make_source("https://models.example/x.h5", file_hash="abc")  # not a sha256
    with pytest.raises(ValueError):
        Source("x", "https://a.example/y.h5", "z.h5", "md5", MD5, None, "MIT", None, "backbone", "h5", "d")


def test_download_trained_weights_copies_from_cache(server, tmp_path, monkeypatch):
    from mrcnn import utils
    _, base = server
    _Handler.files["/w/mask_rcnn_coco.h5"] = PAYLOAD
    monkeypatch.setitem(pretrained.SOURCES, "coco", make_source(base + "/w/mask_rcnn_coco.h5", name="coco"))
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "kh"))
    target = tmp_path / "proj" / "mask_rcnn_coco.h5"
    utils.download_trained_weights(str(target), verbose=0)
    assert target.read_bytes() == PAYLOAD
    assert (tmp_path / "kh" / "models" / "mask_rcnn_coco.h5").read_bytes() == PAYLOAD
    assert os.listdir(target.parent) == ["mask_rcnn_coco.h5"]


def test_imports_without_tensorflow():
    code = ("import sys, mrcnn.pretrained; "
            "bad = [m for m in ('tensorflow', 'keras', 'torch') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))
