"""Readers parse each publisher's format exactly, and reject bad input with the file and line."""

from __future__ import annotations

import pytest

from genrec.data.errors import DataError
from genrec.data.readers import read_amazon_ratings, read_movielens_1m, read_movielens_csv
from tests.conftest import AMAZON_CSV, ML1M_RATINGS, ML_CSV_RATINGS, write_ml1m, write_ml_csv, zip_folder


def test_ml1m_reader_parses_dat_fields_and_latin1_titles(tmp_path):
    raw = read_movielens_1m(write_ml1m(tmp_path / "ml-1m"))
    assert raw.events.num_rows == 10
    assert raw.events.column("user").to_pylist()[:3] == ["1", "1", "1"]
    assert raw.events.column("rating").to_pylist()[:2] == [5.0, 3.0]
    assert raw.events.column("timestamp").to_pylist()[0] == 978300760
    titles = raw.items.column("title").to_pylist()
    assert "Misérables, Les (1995)" in titles
    assert raw.items.column("genres").to_pylist()[0] == ["Animation", "Children's", "Comedy"]
    assert raw.users_without_events == 1  # user 4 is listed in users.dat and rated nothing


def test_ml1m_reader_reads_publisher_zip_with_subfolder(tmp_path):
    folder = write_ml1m(tmp_path / "src")
    archive = zip_folder(folder, tmp_path / "ml-1m.zip", "ml-1m")
    raw = read_movielens_1m(archive)
    assert raw.events.num_rows == 10 and raw.items.num_rows == 5


def test_movielens_csv_reader_handles_quoted_titles_and_half_stars(tmp_path):
    raw = read_movielens_csv(write_ml_csv(tmp_path / "ml"))
    assert raw.events.column("rating").to_pylist()[3:6] == [2.5, 3.5, 0.5]
    assert "American President, The (1995)" in raw.items.column("title").to_pylist()


def test_amazon_reader_keeps_string_ids(tmp_path):
    path = tmp_path / "ratings_Books.csv"
    path.write_text(AMAZON_CSV)
    raw = read_amazon_ratings(path)
    assert raw.events.column("user").to_pylist()[0] == "A1"
    assert raw.events.column("item").to_pylist()[1] == "B002"
    assert raw.events.num_rows == 6
    assert read_amazon_ratings(tmp_path).events.num_rows == 6  # folder holding the one csv


def test_real_ml_latest_small_has_published_counts(shared_data):
    raw = read_movielens_csv(shared_data / "ml-latest-small" / "ml-latest-small.zip")
    assert raw.events.num_rows == 100_836
    assert len(set(raw.events.column("user").to_pylist())) == 610
    assert len(set(raw.events.column("item").to_pylist())) == 9_724
    assert raw.items.num_rows == 9_742


# --- bad input: each case names the file and the line ---------------------------------------------

def _ml1m_error(tmp_path, ratings: bytes) -> DataError:
    folder = write_ml1m(tmp_path / "bad")
    (folder / "ratings.dat").write_bytes(ratings)
    with pytest.raises(DataError) as err:
        read_movielens_1m(folder)
    assert "ratings.dat" in str(err.value)
    return err.value


def test_truncated_line_is_reported_with_its_line(tmp_path):
    err = _ml1m_error(tmp_path, b"1::10::5::978300760\n1::20::3::978302109\n1::30::4\n")
    assert err.line == 3 and "expected 4" in str(err) and "got 3" in str(err)


def test_wrong_separator_in_dat_file(tmp_path):
    err = _ml1m_error(tmp_path, b"1,10,5,978300760\n")
    assert err.line == 1 and "'::'-separated" in str(err)


def test_wrong_separator_in_csv_header(tmp_path):
    folder = write_ml_csv(tmp_path / "bad", ratings=ML_CSV_RATINGS.replace(",", ";"))
    with pytest.raises(DataError, match=r"ratings.csv:1: header is 'userId;movieId"):
        read_movielens_csv(folder)


def test_non_numeric_field(tmp_path):
    err = _ml1m_error(tmp_path, b"1::10::5::978300760\n1::x20::3::978302109\n")
    assert err.line == 2 and "'item'" in str(err) and "x20" in str(err)


def test_non_numeric_rating_in_csv(tmp_path):
    bad = ML_CSV_RATINGS.replace("1,6,4.0,", "1,6,four,")
    folder = write_ml_csv(tmp_path / "bad", ratings=bad)
    with pytest.raises(DataError) as err:
        read_movielens_csv(folder)
    assert err.value.line == 4 and "'rating'" in str(err.value) and "four" in str(err.value)


def test_rating_out_of_range(tmp_path):
    err = _ml1m_error(tmp_path, b"1::10::5::978300760\n1::20::7::978302109\n")
    assert err.line == 2 and "outside [1, 5]" in str(err)


def test_bad_encoding_names_line(tmp_path):
    bad = ML_CSV_RATINGS.encode("utf-8").replace(b"2,3,3.5", b"2,3\xff,3.5")
    folder = write_ml_csv(tmp_path / "bad")
    (folder / "ratings.csv").write_bytes(bad)
    with pytest.raises(DataError) as err:
        read_movielens_csv(folder)
    assert err.value.line == 6 and "not valid utf-8" in str(err.value)


def test_blank_line_is_an_error_not_a_skipped_row(tmp_path):
    err = _ml1m_error(tmp_path, b"1::10::5::978300760\n\n1::20::3::978302109\n")
    assert err.line == 2


def test_empty_id_field(tmp_path):
    err = _ml1m_error(tmp_path, ML1M_RATINGS.replace("2::30::2", "::30::2").encode())
    assert err.line == 5 and "'user'" in str(err)


def test_missing_file_is_named(tmp_path):
    folder = write_ml1m(tmp_path / "x")
    (folder / "movies.dat").unlink()
    with pytest.raises(DataError, match="movies.dat"):
        read_movielens_1m(folder)
