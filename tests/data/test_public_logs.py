"""Readers of the public multi-action logs, each on a small fixture written in exactly the published format."""

from __future__ import annotations

import errno
import fcntl
import gzip
import hashlib
import json
import os
import shutil
import tarfile

import polars as pl
import pytest

from genrec.data import public_logs
from genrec.data.errors import DataError
from genrec.data.eventlog import scan
from genrec.data.store import StoreConfig, build, load

KEEP_ALL = StoreConfig(min_user_events=1)

KUAIRAND_HEADER = ("user_id,video_id,date,hourmin,time_ms,is_click,is_like,is_follow,is_comment,is_forward,"
                   "is_hate,long_view,play_time_ms,duration_ms,profile_stay_time,comment_stay_time,"
                   "is_profile_enter,is_rand,tab")
KUAIRAND_STANDARD = f"""{KUAIRAND_HEADER}
0,4354972,20220409,900,1649467982289,0,0,0,0,0,0,0,0,70100,0,0,0,0,0
0,2528540,20220409,900,1649467990000,1,1,0,0,0,0,1,5332,11450,0,0,0,0,0
0,1329429,20220410,1000,1649555000000,1,0,1,1,0,0,0,22000,51422,3,0,1,0,1
17387,1123453,20220421,400,1650485801301,1,0,0,0,1,0,1,151024,104400,0,0,0,0,1
17387,4354972,20220421,401,1650485860000,0,0,0,0,0,1,0,1000,70100,0,0,0,0,1
"""
KUAIRAND_RANDOM = f"""{KUAIRAND_HEADER}
0,7000,20220423,1200,1650700000000,1,0,0,0,0,0,1,9000,9000,0,0,0,1,2
"""


def write_kuairand(root, version="KuaiRand-Pure", suffix="pure"):
    data = root / version / "data"
    data.mkdir(parents=True)
    (data / f"log_standard_4_08_to_4_21_{suffix}.csv").write_text(KUAIRAND_STANDARD)
    (data / f"log_random_4_22_to_5_08_{suffix}.csv").write_text(KUAIRAND_RANDOM)
    (data / f"user_features_{suffix}.csv").write_text("user_id,user_active_degree\n0,high_active\n")
    return root / version


def test_kuairand_reads_the_standard_logs_with_six_signals(tmp_path):
    spec = public_logs.kuairand(write_kuairand(tmp_path))
    seq = load(build(spec, tmp_path / "s", KEEP_ALL))
    assert seq.signal_names == ["click", "like", "follow", "comment", "forward", "long_view"]
    assert len(seq.items) == 5 and seq.user_raw == ["0", "17387"]
    assert seq.signal_labels[1].tolist() == [1, 1, 0, 0, 0, 1]  # user 0's second impression
    assert seq.signal_labels[2].tolist() == [1, 0, 1, 1, 0, 0]
    assert seq.timestamps[0] == 1649467982  # time_ms in seconds
    with_random = load(build(public_logs.kuairand(tmp_path / "KuaiRand-Pure", include_random=True),
                             tmp_path / "r", KEEP_ALL))
    assert len(with_random.items) == 6


def test_kuairand_1k_layout_and_unknown_signal(tmp_path):
    spec = public_logs.kuairand(write_kuairand(tmp_path, "KuaiRand-1K", "1k"), signals=("click", "hate"))
    assert scan(spec).report["source_events"] == 5
    with pytest.raises(ValueError, match="unknown"):
        public_logs.kuairand(tmp_path / "KuaiRand-1K", signals=("clicks",))


KUAISAR = """user_id,item_id,playing_time,duration_ms,time,timestamp,click,forward,like,follow,search,\
search_item_related
1,1,60792.0,45400.0,2023-05-22 15:53:20,1.68474200e+12,1,1,1,1,1,1
1,2,1000.0,45400.0,2023-05-22 15:53:20,1.68474200e+12,0,0,0,0,0,0
1,3,3000.0,8000.0,2023-05-22 16:00:00,1684742400000.0,1,0,0,0,0,0
2,1,500.0,45400.0,2023-05-23 09:00:00,1684803600000.0,0,0,0,0,1,0
"""


def test_kuaisar_reads_rec_inter_with_float_millisecond_times(tmp_path):
    folder = tmp_path / "KuaiSAR"
    folder.mkdir()
    (folder / "rec_inter.csv").write_text(KUAISAR)
    seq = load(build(public_logs.kuaisar(folder), tmp_path / "s", KEEP_ALL))
    assert seq.signal_names == ["click", "like", "follow", "forward", "search"]
    assert seq.timestamps[:3].tolist() == [1684742000, 1684742000, 1684742400]
    assert seq.request_ids[:3].tolist() == [0, 0, 1]  # items sent together share a timestamp
    assert seq.signal_labels[0].tolist() == [1, 1, 1, 1, 1]


RECFLOW_COLUMNS = ["request_id", "request_timestamp", "user_id", "device_id", "age", "gender", "province",
                   "video_id", "author_id", "category_level_one", "category_level_two", "upload_type",
                   "upload_timestamp", "duration", "realshow", "rerank_pos", "rerank_neg", "rank_pos", "rank_neg",
                   "coarse_neg", "prerank_neg", "rank_index", "rerank_index", "playing_time", "effective_view",
                   "long_view", "like", "follow", "forward", "comment"]


def test_recflow_reads_realshow_feather_with_request_ids(tmp_path):
    realshow = tmp_path / "RecFlow" / "realshow"
    realshow.mkdir(parents=True)
    rows = [  # request 100 shows two videos to user 5; request 101 one video; user 6 one request
        [100, 1705100000000, 5, 9, 3, 1, 2, 70, 7, 1, 11, 0, 1704000000, 30000, 1, 1, 0, 1, 0, 0, 0, 3, 1, 20000,
         1, 0, 1, 0, 0, 0],
        [100, 1705100000000, 5, 9, 3, 1, 2, 71, 8, 2, 12, 0, 1704000000, 30000, 1, 1, 0, 1, 0, 0, 0, 4, 2, 1000,
         0, 0, 0, 0, 0, 0],
        [101, 1705100500000, 5, 9, 3, 1, 2, 72, 7, 1, 11, 0, 1704000000, 10000, 1, 1, 0, 1, 0, 0, 0, 1, 1, 12000,
         1, 1, 0, 1, 1, 1],
        [102, 1705200000000, 6, 10, 4, 0, 3, 70, 7, 1, 11, 0, 1704000000, 30000, 1, 1, 0, 1, 0, 0, 0, 2, 3, 5000,
         0, 0, 0, 0, 0, 0],
    ]
    frame = pl.DataFrame(rows, schema=RECFLOW_COLUMNS, orient="row")
    frame[:3].write_ipc(realshow / "2024-01-13.feather")
    frame[3:].write_ipc(realshow / "2024-01-14.feather")
    seq = load(build(public_logs.recflow(tmp_path / "RecFlow"), tmp_path / "s", KEEP_ALL))
    assert seq.signal_names == ["effective_view", "long_view", "like", "follow", "forward", "comment"]
    assert seq.request_ids[:3].tolist() == [0, 0, 1] and len(seq.items) == 4
    assert seq.signal_labels[2].tolist() == [1, 1, 0, 1, 1, 1]
    assert seq.item_genres[seq.item_raw.index("71")] == ["author_id=8", "category_level_one=2"]


TAOBAO = """1,2268318,2520377,pv,1511544070
1,2333346,2520771,pv,1511561733
1,2268318,2520377,buy,1511572885
2,3830808,4181361,cart,1511593493
2,4365585,2520377,fav,1511596146
"""


def test_taobao_reads_headerless_behaviour_rows_as_four_signals(tmp_path):
    folder = tmp_path / "taobao"
    folder.mkdir()
    (folder / "UserBehavior.csv").write_text(TAOBAO)
    spec = public_logs.taobao(folder)
    seq = load(build(spec, tmp_path / "s", KEEP_ALL))
    assert seq.signal_names == ["pv", "cart", "fav", "buy"]
    assert seq.signal_labels[:5].tolist() == [[1, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1], [0, 1, 0, 0],
                                              [0, 0, 1, 0]]
    assert seq.labels[:5].tolist() == [0, 0, 1, 0, 0]  # the label is buy
    assert seq.item_genres[seq.item_raw.index("3830808")] == ["category_id=4181361"]


def test_taobao_buy_and_view_in_one_second_stay_a_buy(tmp_path):
    path = tmp_path / "UserBehavior.csv"
    path.write_text("1,100,7,pv,1511544070\n1,100,7,buy,1511544090\n1,100,7,pv,1511544090\n1,102,7,pv,1511544100\n")
    logs = []
    seq = load(build(public_logs.taobao(path), tmp_path / "s", KEEP_ALL, log=logs.append))
    assert seq.signal_labels.tolist() == [[1, 0, 0, 0], [1, 0, 0, 1], [1, 0, 0, 0]]  # the pv line came last
    assert seq.labels.tolist() == [0, 1, 0] and any("1 duplicate events" in line for line in logs)


def test_taobao_unknown_behaviour_names_the_line(tmp_path):
    path = tmp_path / "UserBehavior.csv"
    path.write_text(TAOBAO.replace("cart", "like"))
    with pytest.raises(DataError, match=r"UserBehavior.csv:4: column 'behavior_type' is 'like', expected one of"):
        scan(public_logs.taobao(path))


AMAZON_2014 = [
    {"reviewerID": "A2SUAM1J3GNN3B", "asin": "0000013714", "reviewerName": "J. McDonald", "helpful": [2, 3],
     "reviewText": "I bought this for my husband.", "overall": 5.0, "summary": "Heavenly Highway Hymns",
     "unixReviewTime": 1252800000, "reviewTime": "09 13, 2009"},
    {"reviewerID": "A2SUAM1J3GNN3B", "asin": "0000029831", "helpful": [0, 0], "reviewText": "ok",
     "overall": 3.0, "summary": "fine", "unixReviewTime": 1262800000, "reviewTime": "01 6, 2010"},
    {"reviewerID": "AXYZ", "asin": "0000013714", "helpful": [0, 0], "reviewText": "great", "overall": 4.0,
     "summary": "good", "unixReviewTime": 1300000000, "reviewTime": "03 13, 2011"},
]
AMAZON_2018 = [
    {"overall": 5.0, "verified": True, "reviewTime": "09 13, 2009", "reviewerID": "A1", "asin": "B1",
     "style": {"Format:": " Hardcover"}, "reviewerName": "x", "reviewText": "a", "summary": "b",
     "unixReviewTime": 1252800000, "vote": "2"},
    {"overall": 2.0, "verified": False, "reviewTime": "09 14, 2009", "reviewerID": "A1", "asin": "B2",
     "reviewText": "c", "summary": "d", "unixReviewTime": 1252900000},
]


def write_json_gz(path, records):
    with gzip.open(path, "wt") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return path


@pytest.mark.parametrize("records,name", [(AMAZON_2014, "reviews_Books_5.json.gz"), (AMAZON_2018, "Books_5.json.gz")])
def test_amazon_json_dumps_become_rating_signals(tmp_path, records, name):
    path = write_json_gz(tmp_path / name, records)
    seq = load(build(public_logs.amazon(path), tmp_path / "s", KEEP_ALL))
    assert seq.signal_names == ["like", "five_star"]
    values = {(seq.user_raw[u], seq.item_raw[seq.items[i] - 1]): seq.signal_labels[i].tolist()
              for u in range(seq.num_users) for i in range(seq.user_offsets[u], seq.user_offsets[u + 1])}
    first = records[0]
    assert values[(first["reviewerID"], first["asin"])] == [1, 1]  # 5 stars: > 3 and = 5
    assert values[(records[1]["reviewerID"], records[1]["asin"])] == [0, 0]


def test_amazon_line_without_a_rating_names_the_line(tmp_path):
    bad = [AMAZON_2014[0], {k: v for k, v in AMAZON_2014[1].items() if k != "overall"}]
    path = write_json_gz(tmp_path / "reviews_Books_5.json.gz", bad)
    with pytest.raises(DataError, match=r"reviews_Books_5.json.gz:2: field 'overall' is missing"):
        public_logs.amazon(path)


@pytest.mark.parametrize("bad,message", [({"reviewerID": "A", "overall": 5.0, "unixReviewTime": 1},
                                          "field 'asin' is missing"), ("not json", "not a JSON object")])
def test_amazon_errors_count_blank_lines_in_the_line_number(tmp_path, bad, message):
    good = json.dumps(AMAZON_2014[0]) + "\n"
    path = tmp_path / "reviews.json"
    path.write_text(good + "\n" + good + (bad if isinstance(bad, str) else json.dumps(bad)) + "\n")
    with pytest.raises(DataError, match=f"reviews.json:4: {message}"):
        public_logs.amazon_to_parquet(path, tmp_path / "reviews.parquet")


def _published(tmp_path, source) -> dict:
    """``source`` (a KuaiRand-Pure folder) as its publisher serves it: a tar.gz and a Zenodo record
    with its md5, both local; the ``ensure_log`` arguments that fetch it."""
    archive = tmp_path / "KuaiRand-Pure.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(source, arcname="KuaiRand-Pure")
    api = tmp_path / "record.json"
    api.write_text(json.dumps({"files": [{"key": archive.name,
                                          "checksum": "md5:" + hashlib.md5(archive.read_bytes()).hexdigest()}]}))
    return {"url": archive.as_uri(), "checksum_api": api.as_uri()}


def test_kuairand_download_is_checked_against_zenodos_md5(tmp_path):
    source = write_kuairand(tmp_path / "src")
    archive = tmp_path / "KuaiRand-Pure.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(source, arcname="KuaiRand-Pure")
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    api = tmp_path / "record.json"
    api.write_text(json.dumps({"files": [{"key": "KuaiRand-Pure.tar.gz", "checksum": f"md5:{md5}"}]}))
    folder = public_logs.ensure_log("kuairand-pure", tmp_path / "root", url=archive.as_uri(),
                                    checksum_api=api.as_uri())
    spec = public_logs.kuairand(folder)
    assert scan(spec).report["source_events"] == 5
    api.write_text(json.dumps({"files": [{"key": "KuaiRand-1K.tar.gz", "checksum": "md5:" + "0" * 32}]}))
    with pytest.raises(DataError, match="Zenodo publishes 0000"):
        public_logs.ensure_log("kuairand-1k", tmp_path / "root2", url=archive.as_uri(), checksum_api=api.as_uri())
    assert not any((tmp_path / "root2").iterdir())  # nothing unverified is kept


def test_kuairand_extraction_killed_midway_is_done_again_not_read_half(tmp_path, monkeypatch):
    source = write_kuairand(tmp_path / "src")
    (source / "data" / "log_standard_4_22_to_5_08_pure.csv").write_text(
        "user_id,video_id,time_ms,is_click,is_like,is_follow,is_comment,is_forward,long_view\n"
        "9,1,2000,1,0,0,0,0,1\n")
    fetch = _published(tmp_path, source)
    extract_all = tarfile.TarFile.extractall

    def killed(self, path, **kwargs):  # the process dies after the first log file is out
        first = next(m for m in self.getmembers() if "log_standard" in m.name)
        self.extract(first, path, filter="data")
        raise KeyboardInterrupt

    monkeypatch.setattr(tarfile.TarFile, "extractall", killed)
    with pytest.raises(KeyboardInterrupt):
        public_logs.ensure_log("kuairand-pure", tmp_path / "root", **fetch)
    assert not any((tmp_path / "root").iterdir())  # no folder that looks complete
    monkeypatch.setattr(tarfile.TarFile, "extractall", extract_all)
    folder = public_logs.ensure_log("kuairand-pure", tmp_path / "root", **fetch)
    assert scan(public_logs.kuairand(folder)).report["source_events"] == 6  # both log files
    assert [p.name for p in (tmp_path / "root").iterdir()] == ["kuairand-pure"]
    umask = os.umask(0)
    os.umask(umask)
    assert folder.stat().st_mode & 0o777 == 0o777 & ~umask  # as a folder made by mkdir, not a private one


def test_logs_behind_a_form_say_where_to_put_the_files(tmp_path):
    with pytest.raises(DataError, match="kuaisar not found; the publisher serves it behind a form"):
        public_logs.ensure_log("kuaisar", tmp_path)
    with pytest.raises(DataError, match="unknown public log"):
        public_logs.ensure_log("kuairandom", tmp_path)


def test_two_runs_fetching_one_log_at_once_both_get_it(tmp_path, monkeypatch):
    """Every rank of ``genrec train --nproc K`` fetches the log: a second run that starts and finishes
    while the first is still downloading must not pull the first's files from under it."""
    fetch = _published(tmp_path, write_kuairand(tmp_path / "src"))
    copy, runs = shutil.copyfileobj, []

    def first_run_interrupted_by_a_second(src, dst, *args):
        runs.append(len(runs))
        if len(runs) == 1:  # the first run's download: the second run starts and finishes meanwhile
            runs.append(public_logs.ensure_log("kuairand-pure", tmp_path / "root", **fetch))
        return copy(src, dst, *args)

    monkeypatch.setattr(public_logs.shutil, "copyfileobj", first_run_interrupted_by_a_second)
    first = public_logs.ensure_log("kuairand-pure", tmp_path / "root", **fetch)
    assert first == runs[-1] and scan(public_logs.kuairand(first)).report["source_events"] == 5
    assert [p.name for p in (tmp_path / "root").iterdir()] == ["kuairand-pure"]


def test_download_folders_of_killed_runs_are_removed_by_the_next_run(tmp_path):
    """A SIGKILLed run's ``name.tmp-*`` folder (its lock free) goes; a live run's (its lock held by
    another open file description, as another process's would be), one whose run has not locked it
    yet and another log's stay."""
    fetch = _published(tmp_path, write_kuairand(tmp_path / "src"))
    root = tmp_path / "root"
    for name in ("kuairand-pure.tmp-dead", "kuairand-pure.tmp-live", "kuairand-pure.tmp-new", "kuairand-1k.tmp-dead"):
        (root / name).mkdir(parents=True)
        (root / name / "KuaiRand-Pure.tar.gz").write_bytes(b"half a download")
        (root / name / (".owner.new" if name.endswith("new") else ".owner")).touch()  # "new": not locked yet
    live = os.open(root / "kuairand-pure.tmp-live" / ".owner", os.O_RDWR)
    fcntl.flock(live, fcntl.LOCK_EX)
    try:
        folder = public_logs.ensure_log("kuairand-pure", root, **fetch)
    finally:
        os.close(live)
    assert sorted(p.name for p in root.iterdir()) == ["kuairand-1k.tmp-dead", "kuairand-pure",
                                                       "kuairand-pure.tmp-live", "kuairand-pure.tmp-new"]
    assert not (folder / ".owner").exists() and scan(public_logs.kuairand(folder)).report["source_events"] == 5


def test_a_download_on_a_file_system_without_locks_still_completes(tmp_path, monkeypatch):
    """Where flock fails (ENOLCK on some network file systems) the download goes on unlocked, its
    folder is never swept, and no lock file ends up in the log's folder."""
    fetch = _published(tmp_path, write_kuairand(tmp_path / "src"))

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(public_logs.fcntl, "flock", no_locks)
    (tmp_path / "root" / "kuairand-pure.tmp-other").mkdir(parents=True)
    (tmp_path / "root" / "kuairand-pure.tmp-other" / ".owner").touch()  # cannot be tried: kept
    folder = public_logs.ensure_log("kuairand-pure", tmp_path / "root", **fetch)
    assert not list(folder.glob(".owner*")) and scan(public_logs.kuairand(folder)).report["source_events"] == 5
    assert (tmp_path / "root" / "kuairand-pure.tmp-other").is_dir()
