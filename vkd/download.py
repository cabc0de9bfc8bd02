"""Download and safely unpack public archives (OpenI): resumable, verified, never extracted outside
its folder.

data.py calls fetch_openi() for `--data openi`; everything here is also usable on its own.
"""
import gzip
import hashlib
import http.client
import os
import shutil
import socket
import tarfile
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path

from tqdm import tqdm

from vkd.openi import OPENI_URL
from vkd.reports import DataError, write_error

OPENI_REPORTS_SIZE = 1_112_632
OPENI_REPORTS_SHA256 = "8fb6de7eec73d8c3665067ad4bb003ccd57f971ae316d2642e1627ac7268667a"
TIMEOUT_S = 60           # per socket operation, not per file
BACKOFF_S = 2.0          # wait before retry k is BACKOFF_S * 2**k
CHUNK = 1 << 20
# Worth another try: the network or the server may recover. A 4xx answer will not, so it is not
# retried.
TRANSIENT = (urllib.error.URLError, ConnectionError, TimeoutError, socket.timeout,
             http.client.IncompleteRead)
CORRUPT = (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile)
# The standard library's extraction filters (Python 3.12+, backported to 3.8.17, 3.9.17, 3.10.12,
# 3.11.4) know more ways an archive can escape its folder than a few lines of checks; where they
# exist they decide, and the explicit checks in _refusal are the fallback (the tests run both). One
# difference: the filter lets a link that stays inside the target through, the fallback refuses
# every link.
USE_TAR_FILTER = hasattr(tarfile, "data_filter")


class DownloadError(DataError):
    """The server could not be reached or refused the file, after all retries."""


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _fetch_once(url, part, size):
    """Append the rest of `url` to `part`, resuming from its current length with a Range request."""
    start = part.stat().st_size if part.exists() else 0
    if size is not None and start >= size:
        # complete (or too long: verification says so)
        return
    request = urllib.request.Request(url, headers={"Range": f"bytes={start}-"} if start else {})
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as error:
        if error.code != 416 or not start:
            raise
        total = error.headers.get("Content-Range", "").rpartition("/")[2]
        # nothing left to send: the part is complete
        if not total.isdigit() or int(total) == start:
            return
        # longer than the file: not a prefix of it
        part.unlink()
        raise ConnectionError(f"{url}: the partial download is longer than the file; "
                              f"starting over") from None
    with response:
        # the server ignored Range: start over
        if start and response.status != 206:
            start = 0
        elif start and not response.headers.get("Content-Range", "").startswith(
                f"bytes {start}-"):
            part.unlink()
            raise ConnectionError(f"{url}: the server sent another range than bytes {start}-; "
                                  f"starting over")
        expected = (int(response.headers["Content-Length"]) if "Content-Length" in response.headers
                    else None)
        received = 0
        with open(part, "ab" if start else "wb") as file, tqdm(
                desc=part.name[:-len(".part")],
                total=start + expected if expected is not None else size,
                initial=start, unit="B", unit_scale=True, unit_divisor=1024) as bar:
            while chunk := response.read(CHUNK):
                try:
                    file.write(chunk)
                except OSError as error:      # a full disk: the .part so far is kept, resumable
                    raise write_error(part, error) from error
                received += len(chunk)
                bar.update(len(chunk))
    # urllib returns b"" on a cut, not an error
    if expected is not None and received < expected:
        raise http.client.IncompleteRead(b"", expected - received)


def download(url, dest, sha256=None, size=None, retries=3):
    """Download `url` to `dest` through `dest.part`, which is resumed, verified and only then
    renamed.

    A cut connection keeps the .part, so the next try (in this call or a later run) continues where
    it stopped. `dest` exists only once the file is complete and matches `size` and `sha256` where
    given.
    """
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise write_error(dest.parent, error) from error
    for attempt in range(retries + 1):
        try:
            _fetch_once(url, part, size)
            break
        except urllib.error.HTTPError as error:
            if error.code < 500:
                raise DownloadError(f"{url}: HTTP {error.code} {error.reason}") from None
            last_error = error
        except TRANSIENT as error:
            last_error = error
        if attempt < retries:
            time.sleep(BACKOFF_S * 2 ** attempt)
    else:
        kept = (f"; {part} ({part.stat().st_size} bytes) is kept and resumed next time"
                if part.exists() else "")
        raise DownloadError(f"{url}: failed after {retries + 1} tries ({last_error}){kept}")
    actual_size = part.stat().st_size
    actual_sha256 = file_sha256(part) if sha256 else None
    if (size is not None and actual_size != size) or (sha256 and actual_sha256 != sha256.lower()):
        part.unlink()
        raise DataError(f"{dest.name} from {url} is not the expected file: expected {size} bytes, "
                        f"sha256 {sha256}; got {actual_size} bytes, sha256 {actual_sha256}. "
                        f"It was deleted; run again, or check the URL")
    os.replace(part, dest)
    return dest


def _refusal(member, target):
    """Why `member` may not be extracted under `target`, or None when it is a plain file or folder
    inside. The explicit checks, used where tarfile has no extraction filters."""
    if member.issym() or member.islnk():
        return f"is a link to {member.linkname!r}"
    if not (member.isfile() or member.isdir()):
        return "is a device, fifo or other special file"
    if os.path.isabs(member.name):
        return "has an absolute path"
    path = os.path.normpath(os.path.join(target, member.name))
    if path != target and not path.startswith(target + os.sep):
        return "would land outside the target folder"


def _filter_refusal(member, target):
    """Why tarfile's "data" filter refuses `member` under `target`, in _refusal's words, or None. A
    member whose name the filter would rewrite (it strips a leading /) is refused too: the archive
    is not as made."""
    try:
        filtered = tarfile.data_filter(member, target)
    except (tarfile.AbsoluteLinkError, tarfile.LinkOutsideDestinationError):
        return f"is a link to {member.linkname!r} outside the target folder"
    except tarfile.SpecialFileError:
        return "is a device, fifo or other special file"
    except tarfile.AbsolutePathError:
        return "has an absolute path"
    except tarfile.OutsideDestinationError:
        return "would land outside the target folder"
    except tarfile.FilterError as error:
        return f"is refused by tarfile's data filter ({error})"
    if filtered.name != member.name:
        return "has an absolute path"


def _extract_member(archive, member, partial):
    """Write one checked member under `partial`: through the data filter where it exists, else by
    hand (only plain files and folders get here: _refusal refused everything else)."""
    if USE_TAR_FILTER:
        archive.extract(member, partial, filter="data")
        return
    path = partial / member.name
    if member.isdir():
        path.mkdir(parents=True, exist_ok=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with archive.extractfile(member) as source, open(path, "wb") as file:
        shutil.copyfileobj(source, file, CHUNK)


def safe_extract(archive_path, target):
    """Extract a .tar/.tgz into `target` (which must not exist yet), refusing any hostile member.

    Every member is checked, and the whole archive read to its end (so a truncated or corrupted one
    is found), before anything is written. Files are written into a sibling `target.partial` folder
    that is renamed to `target` at the end, so an interrupted extraction never looks like a complete
    one.
    """
    archive_path, target = Path(archive_path), Path(target)
    if target.exists():
        raise DataError(f"{target} already exists; remove it to extract {archive_path} again")
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        with tarfile.open(archive_path, "r:*") as archive:
            members = archive.getmembers()
            # reach the gzip trailer: checks CRC and length
            while archive.fileobj.read(CHUNK):
                pass
            refusal = _filter_refusal if USE_TAR_FILTER else _refusal
            for member in members:
                reason = refusal(member, os.path.abspath(partial))
                if reason:
                    raise DataError(f"refusing to extract {archive_path}: "
                                    f"member {member.name!r} {reason}")
            partial.mkdir(parents=True)
            for member in tqdm(members, desc=f"extracting {archive_path.name}", unit="file"):
                _extract_member(archive, member, partial)
    except BaseException as error:
        shutil.rmtree(partial, ignore_errors=True)
        if isinstance(error, CORRUPT):
            raise DataError(f"{archive_path} is corrupt or truncated ({error!r}); "
                            f"delete it and download it again") from None
        if isinstance(error, OSError):        # a full disk: nothing of the extraction is left
            raise write_error(partial, error) from error
        raise
    os.replace(partial, target)
    return target


def has_openi_files(folder):
    """Whether `folder` holds OpenI as downloaded or extracted (by us, or by hand)."""
    names = ("ecgen-radiology", "NLMCXR_reports.tgz", "NLMCXR_png.tgz", "NLMCXR_png")
    return any((folder / name).exists() for name in names)


def openi_root(data_dir):
    """The folder holding the OpenI files: DATA_DIR/openi/ (where downloads go), or DATA_DIR itself
    when the archives (or what they extract to) were put there by hand, e.g. --data-dir
    ~/Downloads/openi."""
    data_dir = Path(data_dir)
    if not has_openi_files(data_dir / "openi") and has_openi_files(data_dir):
        return data_dir
    return data_dir / "openi"


def png_folder(root):
    """The folder of PNGs under `root`: NLMCXR_png/, or else the one folder directly inside that
    holds PNGs (the image archive extracted by hand under another name); None when there is none
    yet."""
    if (root / "NLMCXR_png").is_dir():
        return root / "NLMCXR_png"
    folders = [path for path in sorted(root.iterdir())
               if path.is_dir() and next(path.rglob("*.png"), None)] \
        if root.is_dir() else []
    if len(folders) > 1:
        raise DataError(f"{root} holds several folders of PNGs "
                        f"({', '.join(p.name for p in folders)}); "
                        f"rename the one extracted from NLMCXR_png.tgz to NLMCXR_png")
    return folders[0] if folders else None


def fetch_openi(data_dir, base_url=None, reports_sha256=OPENI_REPORTS_SHA256,
                reports_size=OPENI_REPORTS_SIZE, images_sha256=None, images_size=None, retries=3):
    """Make sure the OpenI reports and PNG folder are there (see openi_root), downloading only what
    is missing.

    Returns (root, reports source, images folder). Files a user put there by hand (the .tgz
    archives, ecgen-radiology/, NLMCXR_png/ or another folder of PNGs) are used as they are. The
    reports are read straight from the .tgz; the PNG archive is extracted into NLMCXR_png/
    (find_images searches it recursively, so it does not matter whether the archive has a top
    folder). base_url None: the official address, OPENI_URL.
    """
    base_url = base_url or OPENI_URL
    root = openi_root(data_dir)
    reports_dir, reports_tgz = root / "ecgen-radiology", root / "NLMCXR_reports.tgz"
    images_tgz = root / "NLMCXR_png.tgz"
    images = png_folder(root) or root / "NLMCXR_png"
    wanted = []
    if not reports_dir.is_dir() and not reports_tgz.exists():
        wanted.append((reports_tgz, reports_sha256, reports_size))
    if not images.is_dir() and not images_tgz.exists():
        wanted.append((images_tgz, images_sha256, images_size))
    for dest, sha256, size in wanted:
        try:
            download(f"{base_url}/{dest.name}", dest, sha256, size, retries)
        except DownloadError as error:
            missing = [d for d, _, _ in wanted if not d.exists()]
            parts = [str(p) for d in missing if (p := d.with_name(d.name + ".part")).exists()]
            raise DataError(
                f"could not download OpenI ({error}).\nDownload by hand:\n"
                + "".join(f"  {base_url}/{d.name}\n" for d in missing)
                + f"and put {reports_tgz.name} in {root}/ (as is, or extracted to {reports_dir}/) "
                f"and {images_tgz.name} in {root}/ "
                f"(as is, or with its PNGs extracted into {images}/), "
                f"or pass the folder holding them as --data-dir."
                + (f"\nPartial downloads are kept and resumed next time: {', '.join(parts)}"
                   if parts else "")
            ) from None
    if not images.is_dir():
        try:
            safe_extract(images_tgz, images)
        except DataError as error:
            if images_tgz not in [dest for dest, _, _ in wanted]:
                raise
            # our own download: fetch it anew next run
            images_tgz.unlink()
            raise DataError(f"{error}. It was downloaded just now and has been deleted; "
                            f"run again") from None
    return root, (reports_dir if reports_dir.is_dir() else reports_tgz), images
