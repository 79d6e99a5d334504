"""Download path: fetched from a local HTTP server, checksum verified, clear errors offline."""

from __future__ import annotations

import functools
import hashlib
import http.server
import threading

import pytest

from genrec.data import registry
from genrec.data.errors import DataError
from tests.conftest import write_ml1m, zip_folder


@pytest.fixture
def served_archive(tmp_path):
    """A fixture ml-1m.zip served by an HTTP server on 127.0.0.1; yields (url, sha256)."""
    site = tmp_path / "site"
    site.mkdir()
    archive = zip_folder(write_ml1m(tmp_path / "src"), site / "ml-1m.zip", "ml-1m")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/ml-1m.zip", hashlib.sha256(archive.read_bytes()).hexdigest()
    server.shutdown()


def _spec(checksum):
    base = registry.DATASETS["ml-1m"]
    return registry.DatasetSpec(base.name, base.url, checksum, base.files, base.reader)


def test_download_fetches_verifies_and_reads(served_archive, tmp_path, monkeypatch):
    url, digest = served_archive
    monkeypatch.setitem(registry.DATASETS, "ml-1m", _spec(("sha256", digest)))
    root = tmp_path / "data"
    path = registry.ensure("ml-1m", root, url=url)
    assert path == root / "ml-1m" / "ml-1m.zip" and path.is_file()
    assert registry.read("ml-1m", root, allow_download=False).events.num_rows == 10
    assert not list((root / "ml-1m").glob("*.part"))


def test_download_with_wrong_checksum_is_rejected_and_not_kept(served_archive, tmp_path, monkeypatch):
    url, _ = served_archive
    monkeypatch.setitem(registry.DATASETS, "ml-1m", _spec(("sha256", "0" * 64)))
    root = tmp_path / "data"
    with pytest.raises(DataError, match="sha256 of the download is"):
        registry.ensure("ml-1m", root, url=url)
    assert not (root / "ml-1m").exists() and not root.exists()  # no empty dataset folder left behind


def test_offline_error_says_which_files_go_where(tmp_path):
    root = tmp_path / "data"
    with pytest.raises(DataError) as err:
        registry.ensure("ml-1m", root, url="http://127.0.0.1:9/ml-1m.zip")  # port 9: nothing listens
    message = str(err.value)
    assert "could not be downloaded" in message
    assert str(root / "ml-1m" / "ml-1m.zip") in message and "ratings.dat" in message
    assert not root.exists()  # a failed download leaves no empty folders


def test_a_failed_download_keeps_folders_that_were_there(tmp_path):
    (tmp_path / "data" / "ml-1m").mkdir(parents=True)
    with pytest.raises(DataError):
        registry.ensure("ml-1m", tmp_path / "data", url="http://127.0.0.1:9/ml-1m.zip")
    assert (tmp_path / "data" / "ml-1m").is_dir()


def test_no_download_when_not_allowed(tmp_path):
    with pytest.raises(DataError, match="not found"):
        registry.ensure("ml-20m", tmp_path, allow_download=False)


def test_extracted_folder_is_found(tmp_path):
    write_ml1m(tmp_path / "ml-1m" / "ml-1m")  # as the publisher's zip extracts
    assert registry.ensure("ml-1m", tmp_path, allow_download=False) == tmp_path / "ml-1m" / "ml-1m"


def test_unknown_dataset_lists_known_ones():
    with pytest.raises(DataError, match="known: .*ml-1m"):
        registry.spec_for("ml-2m")
