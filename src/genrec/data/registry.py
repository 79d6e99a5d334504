"""Known datasets: where the publisher serves them, how to check them, and which reader parses them.

Resolution order for the data root: ``--data-dir``, then ``$GENREC_DATA``, then ``~/.cache/genrec/data``.
Under the root a dataset NAME is found as ``NAME/NAME.zip``, ``NAME.zip``, or an extracted folder
``NAME/`` (files directly inside or one level down, as the publisher's zip extracts). When none is
there it is downloaded from the publisher's URL and its checksum verified before use.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from genrec.data.errors import DataError
from genrec.data.readers import RawData, read_amazon_ratings, read_movielens_1m, read_movielens_csv


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    url: str | None  # publisher's archive; None where the publisher needs a manual download
    checksum: tuple[str, str] | None  # (algorithm, hex digest) of the archive, from the publisher
    files: tuple[str, ...]  # files the reader needs (for messages and for spotting an extracted folder)
    reader: Callable[[str | Path], RawData]


DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in [
        DatasetSpec(
            "ml-latest-small",
            "https://files.grouplens.org/datasets/movielens/ml-latest-small.zip",
            ("sha256", "696d65a3dfceac7c45750ad32df2c259311949efec81f0f144fdfb91ebc9e436"),
            ("ratings.csv", "movies.csv"),
            read_movielens_csv,
        ),
        DatasetSpec(
            "ml-1m",
            "https://files.grouplens.org/datasets/movielens/ml-1m.zip",
            ("md5", "c4d9eecfca2ab87c1945afe126590906"),  # GroupLens' ml-1m.zip.md5
            ("ratings.dat", "movies.dat"),
            read_movielens_1m,
        ),
        DatasetSpec(
            "ml-20m",
            "https://files.grouplens.org/datasets/movielens/ml-20m.zip",
            ("md5", "cd245b17a1ae2cc31bb14903e1204af3"),  # GroupLens' ml-20m.zip.md5
            ("ratings.csv", "movies.csv"),
            read_movielens_csv,
        ),
        DatasetSpec(
            "amazon-books",
            None,  # the ratings-only csv is served behind a request form
            None,
            ("ratings_Books.csv",),
            read_amazon_ratings,
        ),
    ]
}


def data_root(data_dir: str | Path | None = None) -> Path:
    if data_dir is not None:
        return Path(data_dir)
    if os.environ.get("GENREC_DATA"):
        return Path(os.environ["GENREC_DATA"])
    return Path.home() / ".cache" / "genrec" / "data"


def spec_for(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise DataError(name, f"unknown dataset; known: {', '.join(sorted(DATASETS))}")
    return DATASETS[name]


def locate(spec: DatasetSpec, root: Path) -> Path | None:
    """The archive or folder holding ``spec`` under ``root``, or None."""
    for archive in (root / spec.name / f"{spec.name}.zip", root / f"{spec.name}.zip"):
        if archive.is_file():
            return archive
    folder = root / spec.name
    if folder.is_dir():
        for base in (folder, *sorted(p for p in folder.iterdir() if p.is_dir())):
            if all((base / f).is_file() for f in spec.files):
                return base
    return None


def file_digest(path: Path, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download(spec: DatasetSpec, root: Path, url: str | None = None, timeout: float = 60.0) -> Path:
    """Fetch the publisher's archive into ``root/NAME/NAME.zip`` and verify its checksum."""
    url = url or spec.url
    target = root / spec.name / f"{spec.name}.zip"
    if url is None:
        raise DataError(str(target.parent), f"{spec.name} cannot be downloaded automatically; "
                        f"put {', '.join(spec.files)} there")
    created = [p for p in (target.parent, *target.parent.parents) if not p.exists()]  # removed again on failure
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            shutil.copyfileobj(response, out)
        if spec.checksum is not None:
            algorithm, expected = spec.checksum
            got = file_digest(tmp, algorithm)
            if got != expected:
                raise DataError(url, f"{algorithm} of the download is {got}, expected {expected}; "
                                "the file is corrupt or not the publisher's release")
        os.replace(tmp, target)
    except (urllib.error.URLError, OSError) as err:
        raise DataError(
            str(target),
            f"{spec.name} is not under {root} and could not be downloaded from {url} ({err}). "
            f"Offline, put the publisher's {spec.name}.zip at {target} or extract "
            f"{', '.join(spec.files)} into {root / spec.name}/",
        ) from None
    finally:
        tmp.unlink(missing_ok=True)
        if not target.exists():  # a failed download leaves no empty dataset folder behind
            for folder in created:
                if folder.is_dir() and not any(folder.iterdir()):
                    folder.rmdir()
    return target


def ensure(name: str, data_dir: str | Path | None = None, *, allow_download: bool = True,
           url: str | None = None) -> Path:
    """Path to dataset ``name`` under the data root, downloading it when absent (and allowed)."""
    spec = spec_for(name)
    root = data_root(data_dir)
    found = locate(spec, root)
    if found is not None:
        return found
    if not allow_download:
        raise DataError(str(root / spec.name), f"{name} not found; put {spec.name}.zip or "
                        f"{', '.join(spec.files)} there (or allow downloading)")
    return download(spec, root, url=url)


def read(name: str, data_dir: str | Path | None = None, *, allow_download: bool = True) -> RawData:
    spec = spec_for(name)
    return spec.reader(ensure(name, data_dir, allow_download=allow_download))
