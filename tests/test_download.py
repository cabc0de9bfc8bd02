"""Download, resume, verification, safe extraction and offline handling against a local HTTP
server."""
import errno
import hashlib
import io
import socket
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from vkd import download as dl
from vkd.download import download, fetch_openi, safe_extract
from vkd.reports import DataError


class Handler(BaseHTTPRequestHandler):
    """Serves server.files by path; honours Range; can fail with 503, ignore Range, send the wrong
    range (from 0 as a 206), or cut a body once."""

    def do_GET(self):
        server = self.server
        server.requests.append((self.path, self.headers.get("Range")))
        data = server.files.get(self.path)
        if data is None:
            return self.send_error(404)
        if server.fail_503:
            server.fail_503 -= 1
            return self.send_error(503)
        start, byte_range = 0, self.headers.get("Range")
        if byte_range and not server.ignore_range:
            start = 0 if server.wrong_range else int(byte_range.split("=")[1].split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                return self.end_headers()
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        # promise the whole body, send a part, hang up
        if server.cut_after is not None:
            body, server.cut_after = body[:server.cut_after], None
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(autouse=True)
def local_only(monkeypatch):
    """No proxy may route the requests away from 127.0.0.1; retries do not wait."""
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    monkeypatch.setattr(dl, "BACKOFF_S", 0.01)
    monkeypatch.setattr(dl, "TIMEOUT_S", 5)


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.files, httpd.requests = {}, []
    httpd.fail_503, httpd.cut_after, httpd.ignore_range, httpd.wrong_range = 0, None, False, False
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}/files"
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


def closed_port_url():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/files"


def file_sha256_bytes(data):
    return hashlib.sha256(data).hexdigest()


def payload(n=300_000, seed=0):
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def make_tar(members, mode="w:gz"):
    """members: (name, bytes) for files, or TarInfo for anything else. Returns the archive bytes."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as archive:
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                archive.addfile(member)
            else:
                info = tarfile.TarInfo(member[0])
                info.size = len(member[1])
                archive.addfile(info, io.BytesIO(member[1]))
    return buffer.getvalue()


def special(name, kind, linkname=""):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info


def reports_tgz():
    xml = '<eCitation><uId id="CXR{0}"/><parentImage id="CXR{0}_1_IM-0001-1001"/></eCitation>'
    return make_tar([(f"ecgen-radiology/{i}.xml", xml.format(i).encode()) for i in (1, 2)])


def images_tgz():
    return make_tar([(f"NLMCXR_png/CXR{i}_1_IM-0001-1001.png",
                      b"\x89PNG\r\n\x1a\n" + payload(500, i))
                     for i in (1, 2)])


def serve(server, name, data):
    server.files[f"/files/{name}"] = data
    return f"{server.url}/{name}"


# ---------------------------------------------------------------------------------------- download

def test_full_download_with_checksum(server, tmp_path):
    data = payload()
    dest = tmp_path / "a.bin"
    download(serve(server, "a.bin", data), dest, sha256=file_sha256_bytes(data), size=len(data))
    assert dest.read_bytes() == data
    assert not (tmp_path / "a.bin.part").exists()
    assert server.requests == [("/files/a.bin", None)]


def test_resume_after_cut_connection_in_a_later_run(server, tmp_path):
    data, dest = payload(), tmp_path / "a.bin"
    url = serve(server, "a.bin", data)
    server.cut_after = 100_000
    with pytest.raises(DataError, match="kept and resumed"):
        download(url, dest, sha256=file_sha256_bytes(data), retries=0)
    assert not dest.exists()
    assert (tmp_path / "a.bin.part").read_bytes() == data[:100_000]
    download(url, dest, sha256=file_sha256_bytes(data), retries=0)
    assert [r for _, r in server.requests] == [None, "bytes=100000-"]
    assert dest.read_bytes() == data
    assert not (tmp_path / "a.bin.part").exists()


def test_resume_after_cut_connection_within_one_call(server, tmp_path):
    data, dest = payload(), tmp_path / "a.bin"
    server.cut_after = 12_345
    download(serve(server, "a.bin", data), dest, size=len(data))
    assert [r for _, r in server.requests] == [None, "bytes=12345-"]
    assert dest.read_bytes() == data


def test_bad_checksum_leaves_nothing(server, tmp_path):
    data, dest = payload(), tmp_path / "a.bin"
    wrong = "0" * 64
    with pytest.raises(DataError) as error:
        download(serve(server, "a.bin", data), dest, sha256=wrong)
    message = str(error.value)
    assert "a.bin" in message and wrong in message and file_sha256_bytes(data) in message
    assert list(tmp_path.iterdir()) == []


def test_wrong_size_leaves_nothing(server, tmp_path):
    data = payload()
    with pytest.raises(DataError, match=f"expected {len(data) + 1} bytes.*got {len(data)} bytes"):
        download(serve(server, "a.bin", data), tmp_path / "a.bin", size=len(data) + 1)
    assert list(tmp_path.iterdir()) == []


def test_503_is_retried(server, tmp_path):
    data, dest = payload(), tmp_path / "a.bin"
    server.fail_503 = 2
    download(serve(server, "a.bin", data), dest, sha256=file_sha256_bytes(data))
    assert len(server.requests) == 3
    assert dest.read_bytes() == data


def test_404_is_not_retried(server, tmp_path):
    with pytest.raises(DataError, match="HTTP 404"):
        download(f"{server.url}/missing.bin", tmp_path / "missing.bin")
    assert len(server.requests) == 1
    assert list(tmp_path.iterdir()) == []


def test_server_that_ignores_range_restarts_from_zero(server, tmp_path):
    data, dest = payload(), tmp_path / "a.bin"
    (tmp_path / "a.bin.part").write_bytes(data[:50_000])
    server.ignore_range = True
    download(serve(server, "a.bin", data), dest, sha256=file_sha256_bytes(data))
    assert server.requests == [("/files/a.bin", "bytes=50000-")]
    assert dest.read_bytes() == data                            # not the part twice


def test_complete_part_answered_416_is_accepted(server, tmp_path):
    data, dest = payload(), tmp_path / "a.bin"
    (tmp_path / "a.bin.part").write_bytes(data)
    download(serve(server, "a.bin", data), dest, sha256=file_sha256_bytes(data))
    assert server.requests == [("/files/a.bin", f"bytes={len(data)}-")]
    assert dest.read_bytes() == data


def test_206_with_the_wrong_range_is_restarted(server, tmp_path):
    data, dest = payload(), tmp_path / "a.bin"
    (tmp_path / "a.bin.part").write_bytes(data[:1000])
    server.wrong_range = True
    download(serve(server, "a.bin", data), dest)
    assert [r for _, r in server.requests] == ["bytes=1000-", None]
    assert dest.read_bytes() == data


def test_part_longer_than_the_file_is_restarted(server, tmp_path):
    data, dest = payload(), tmp_path / "a.bin"
    (tmp_path / "a.bin.part").write_bytes(data + b"stale tail")
    # no checksum: only the 416 total tells
    download(serve(server, "a.bin", data), dest)
    assert [r for _, r in server.requests] == [f"bytes={len(data) + 10}-", None]
    assert dest.read_bytes() == data


# -------------------------------------------------------------------------------------- extraction

@pytest.fixture(params=["data filter", "explicit checks"])
def extraction(request, monkeypatch):
    """Run a test on both ways of extracting: tarfile's "data" filter (where this Python has it) and
    the explicit member checks. Returns the calls made to tarfile.data_filter."""
    filtered = request.param == "data filter"
    if filtered and not hasattr(tarfile, "data_filter"):
        pytest.skip("this Python's tarfile has no extraction filters")
    monkeypatch.setattr(dl, "USE_TAR_FILTER", filtered)
    calls = []
    if filtered:
        original = tarfile.data_filter
        monkeypatch.setattr(tarfile, "data_filter",
                            lambda member, path: calls.append(member.name) or
                            original(member, path))
    return calls


def test_safe_extract_writes_files_and_cleans_up(tmp_path, extraction):
    (tmp_path / "x.tgz").write_bytes(images_tgz())
    target = safe_extract(tmp_path / "x.tgz", tmp_path / "out")
    assert sorted(p.name for p in target.rglob("*.png")) == ["CXR1_1_IM-0001-1001.png",
                                                             "CXR2_1_IM-0001-1001.png"]
    with tarfile.open(tmp_path / "x.tgz") as archive:
        for member in archive.getmembers():
            assert (target / member.name).read_bytes() == archive.extractfile(member).read()
        assert extraction == ([m.name for m in archive.getmembers()] if dl.USE_TAR_FILTER else [])
    assert not (tmp_path / "out.partial").exists()


@pytest.mark.parametrize("hostile, reason", [("traversal", "outside the target"),
                                             ("absolute", "absolute path"),
                                             ("symlink", "is a link"), ("hardlink", "is a link"),
                                             ("fifo", "special file")])
def test_hostile_archive_is_refused_and_nothing_is_written(tmp_path, hostile, reason, extraction):
    outside = tmp_path / "evil"
    member = {
        "traversal": ("ok/../../../evil", b"x"),
        "absolute": (str(outside), b"x"),
        "symlink": special("ok/link", tarfile.SYMTYPE, str(outside)),
        "hardlink": special("ok/hard", tarfile.LNKTYPE, "../evil"),
        "fifo": special("ok/pipe", tarfile.FIFOTYPE),
    }[hostile]
    (tmp_path / "x.tgz").write_bytes(make_tar([("ok/first.txt", b"fine"), member,
                                               ("ok/last.txt", b"fine")]))
    target = tmp_path / "sub" / "out"
    with pytest.raises(DataError, match="refusing") as error:
        safe_extract(tmp_path / "x.tgz", target)
    name = member[0] if isinstance(member, tuple) else member.name
    assert repr(name) in str(error.value) and reason in str(error.value)
    # nothing outside, nothing inside
    assert not outside.exists() and not (tmp_path / "sub").exists()
    # the explicit checks refuse it too
    assert dl._refusal(member if isinstance(member, tarfile.TarInfo) else tarfile.TarInfo(name),
                       str(target)) is not None
    if dl.USE_TAR_FILTER:
        assert name in extraction                                        # and the filter was asked


@pytest.mark.parametrize("cut", ["half", "trailer"])
def test_truncated_archive_is_refused_as_corrupt(tmp_path, cut, extraction):
    data = images_tgz()
    # -4: only the gzip length field is lost
    data = data[:len(data) // 2] if cut == "half" else data[:-4]
    (tmp_path / "x.tgz").write_bytes(data)
    with pytest.raises(DataError, match="corrupt or truncated.*download it again"):
        safe_extract(tmp_path / "x.tgz", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.tgz"]


# ------------------------------------------------------------------------------------------- OpenI

def test_fetch_openi_downloads_verifies_and_extracts(server, tmp_path):
    reports, images = reports_tgz(), images_tgz()
    serve(server, "NLMCXR_reports.tgz", reports)
    serve(server, "NLMCXR_png.tgz", images)
    root, reports_source, images_root = fetch_openi(
        tmp_path, server.url, reports_sha256=file_sha256_bytes(reports), reports_size=len(reports))
    assert reports_source == tmp_path / "openi" / "NLMCXR_reports.tgz"
    assert reports_source.read_bytes() == reports
    assert len(list(images_root.rglob("*.png"))) == 2
    assert not list(root.glob("*.part")) and not list(root.glob("*.partial"))
    assert len(server.requests) == 2
    fetch_openi(tmp_path, server.url, reports_sha256=file_sha256_bytes(reports),
                reports_size=len(reports))
    assert len(server.requests) == 2                            # second run: everything is there


def test_fetch_openi_deletes_its_own_corrupt_image_download(server, tmp_path):
    serve(server, "NLMCXR_reports.tgz", reports := reports_tgz())
    # no checksum known: only extraction can tell
    serve(server, "NLMCXR_png.tgz", images_tgz()[:-100])
    with pytest.raises(DataError, match="corrupt or truncated.*deleted; run again"):
        fetch_openi(tmp_path, server.url, reports_sha256=file_sha256_bytes(reports),
                    reports_size=len(reports))
    assert sorted(p.name for p in (tmp_path / "openi").iterdir()) == ["NLMCXR_reports.tgz"]


def test_fetch_openi_refuses_wrong_reports_checksum(server, tmp_path):
    serve(server, "NLMCXR_reports.tgz", reports_tgz())
    with pytest.raises(DataError, match="NLMCXR_reports.tgz.*not the expected file"):
        fetch_openi(tmp_path, server.url)                       # the real checksum cannot match
    assert list((tmp_path / "openi").iterdir()) == []


@pytest.mark.parametrize("present", ["archives", "folders", "reports tgz and png folder"])
def test_fetch_openi_uses_present_files_without_any_request(server, tmp_path, present):
    root = tmp_path / "openi"
    root.mkdir()
    if present in ("archives", "reports tgz and png folder"):
        (root / "NLMCXR_reports.tgz").write_bytes(reports_tgz())
    else:
        (root / "ecgen-radiology").mkdir()
        (root / "ecgen-radiology" / "1.xml").write_text("<eCitation/>")
    if present == "archives":
        (root / "NLMCXR_png.tgz").write_bytes(images_tgz())
    else:
        (root / "NLMCXR_png").mkdir()
    _, reports_source, images_root = fetch_openi(tmp_path, server.url)
    assert server.requests == []
    assert reports_source == root / ("ecgen-radiology" if present == "folders"
                                     else "NLMCXR_reports.tgz")
    assert images_root == root / "NLMCXR_png" and images_root.is_dir()


@pytest.mark.parametrize("layout", ["archives", "extracted"])
def test_fetch_openi_uses_files_put_directly_in_data_dir_by_hand(server, tmp_path, layout):
    """--data-dir ~/Downloads/openi holding the two archives, or ecgen-radiology/ and a folder of
    PNGs."""
    if layout == "archives":
        (tmp_path / "NLMCXR_reports.tgz").write_bytes(reports_tgz())
        (tmp_path / "NLMCXR_png.tgz").write_bytes(images_tgz())
    else:
        (tmp_path / "ecgen-radiology").mkdir()
        (tmp_path / "ecgen-radiology" / "1.xml").write_text("<eCitation/>")
        (tmp_path / "my pngs" / "some").mkdir(parents=True)
        (tmp_path / "my pngs" / "some" / "CXR1_1_IM-0001-1001.png").write_bytes(b"png")
    root, reports_source, images_root = fetch_openi(tmp_path, server.url)
    assert server.requests == [] and root == tmp_path and not (tmp_path / "openi").exists()
    if layout == "archives":
        assert reports_source == tmp_path / "NLMCXR_reports.tgz" \
            and images_root == tmp_path / "NLMCXR_png"
        # extracted next to the archive
        assert len(list(images_root.rglob("*.png"))) == 2
    else:
        assert reports_source == tmp_path / "ecgen-radiology" \
            and images_root == tmp_path / "my pngs"


def test_two_folders_of_pngs_by_hand_are_not_guessed_between(server, tmp_path):
    (tmp_path / "NLMCXR_reports.tgz").write_bytes(reports_tgz())
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "x.png").write_bytes(b"png")
    with pytest.raises(DataError,
                       match="several folders of PNGs \\(a, b\\); rename the one .* to NLMCXR_png"):
        fetch_openi(tmp_path, server.url)
    assert server.requests == []


def test_offline_message_names_files_urls_and_places(tmp_path):
    base_url = closed_port_url()
    with pytest.raises(DataError) as error:
        fetch_openi(tmp_path, base_url, retries=1)
    message = str(error.value)
    root = tmp_path / "openi"
    for name in ("NLMCXR_reports.tgz", "NLMCXR_png.tgz"):
        assert f"{base_url}/{name}" in message
    assert f"{root}/" in message and str(root / "ecgen-radiology") in message \
        and str(root / "NLMCXR_png") in message
    assert list(root.iterdir()) == []


def test_offline_after_a_partial_download_keeps_the_part_and_says_so(server, tmp_path):
    reports = reports_tgz()
    serve(server, "NLMCXR_reports.tgz", reports)
    server.cut_after = 100
    with pytest.raises(DataError) as error:
        fetch_openi(tmp_path, server.url, reports_sha256=file_sha256_bytes(reports),
                    reports_size=len(reports), retries=0)
    part = tmp_path / "openi" / "NLMCXR_reports.tgz.part"
    assert str(part) in str(error.value) and "resumed" in str(error.value)
    assert sorted(p.name for p in (tmp_path / "openi").iterdir()) == [part.name]


def test_a_full_disk_during_a_download_is_an_error_naming_the_file(server, tmp_path, monkeypatch):
    """The bytes so far stay in the .part (the next run resumes from there); no traceback."""
    data = payload()
    url, dest = serve(server, "a.bin", data), tmp_path / "a.bin"

    class FullDisk(io.BufferedWriter):
        def write(self, chunk):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(dl, "open", lambda path, mode: FullDisk(io.FileIO(path, mode)),
                        raising=False)
    with pytest.raises(dl.DataError, match=r"cannot write .*a.bin.part: No space left on device "
                                           r"\(.* free there\)"):
        download(url, dest, size=len(data))
    monkeypatch.undo()
    assert not dest.exists()
    download(url, dest, size=len(data))
    assert dest.read_bytes() == data


def test_a_full_disk_during_extraction_leaves_nothing(tmp_path, monkeypatch):
    archive = tmp_path / "a.tgz"
    archive.write_bytes(make_tar([("x/a.txt", b"hello")]))
    def full_disk(archive, member, partial):
        (partial / "x").mkdir()
        (partial / "x" / "a.txt").write_bytes(b"he")           # part of it, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(dl, "_extract_member", full_disk)
    with pytest.raises(dl.DataError, match=r"cannot write .*out.partial: No space left"):
        safe_extract(archive, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tgz"]
