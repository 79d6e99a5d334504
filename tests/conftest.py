"""Shared fixtures: the real development dataset, and tiny datasets written in each publisher's format."""

from __future__ import annotations

import importlib.util
import os
import zipfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "datasets"

# Without a GPU, the fused HSTU kernels run under Triton's CPU interpreter (tests/ops/triton/test_hstu.py).
# Triton reads the switch when it is first imported, which other modules (torch's flex_attention among
# them) may do before that test module loads, so it is set here, before any test module is imported.
if not torch.cuda.is_available() and importlib.util.find_spec("triton") is not None:
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Preprocessing caches go to a per-session folder, never the user's home."""
    os.environ["GENREC_CACHE"] = str(tmp_path_factory.mktemp("genrec-cache"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "ml-latest-small" / "ml-latest-small.zip").is_file():
        pytest.fail(f"development dataset missing: {SHARED_DATA}/ml-latest-small/ml-latest-small.zip")
    return SHARED_DATA


ML1M_RATINGS = """1::10::5::978300760
1::20::3::978302109
1::10::4::978301968
2::20::4::978300275
2::30::2::978824291
2::10::5::978824291
2::40::1::978824300
3::30::3::978300000
3::40::4::978300001
3::20::5::978300002
"""
ML1M_MOVIES = """10::Toy Story (1995)::Animation|Children's|Comedy
20::Jumanji (1995)::Adventure|Children's|Fantasy
30::Misérables, Les (1995)::Drama|Musical
40::City of Lost Children, The (1995)::Adventure|Sci-Fi
50::Never Rated (1999)::Drama
"""
ML1M_USERS = """1::F::1::10::48067
2::M::56::16::70072
3::M::25::15::55117
4::M::45::7::02460
"""

ML_CSV_RATINGS = """userId,movieId,rating,timestamp
1,1,4.0,964982703
1,3,4.0,964981247
1,6,4.0,964982224
2,1,2.5,1445714835
2,3,3.5,1445714835
2,6,0.5,1445715000
2,7,5.0,1445716000
"""
ML_CSV_MOVIES = """movieId,title,genres
1,Toy Story (1995),Adventure|Animation|Children|Comedy|Fantasy
3,"American President, The (1995)",Comedy|Drama|Romance
6,Heat (1995),Action|Crime|Thriller
7,Sabrina (1995),(no genres listed)
"""

AMAZON_CSV = """A1,B001,5.0,1100000000
A1,B002,3.0,1100000100
A1,B003,4.0,1100000200
A2,B001,1.0,1200000000
A2,B003,5.0,1200000000
A2,B004,2.0,1200000300
"""


def write_ml1m(folder: Path, ratings: str = ML1M_RATINGS, movies: str = ML1M_MOVIES,
               users: str | None = ML1M_USERS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ratings.dat").write_bytes(ratings.encode("latin-1"))
    (folder / "movies.dat").write_bytes(movies.encode("latin-1"))
    if users is not None:
        (folder / "users.dat").write_bytes(users.encode("latin-1"))
    return folder


def write_ml_csv(folder: Path, ratings: str = ML_CSV_RATINGS, movies: str = ML_CSV_MOVIES) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ratings.csv").write_text(ratings, encoding="utf-8")
    (folder / "movies.csv").write_text(movies, encoding="utf-8")
    return folder


def zip_folder(folder: Path, archive: Path, prefix: str) -> Path:
    with zipfile.ZipFile(archive, "w") as z:
        for f in sorted(folder.iterdir()):
            z.write(f, f"{prefix}/{f.name}")
    return archive
