"""The malformed-input corpus: every bad input a newcomer met (issue 13), through the ``genrec`` command,
with the exact one-line message and exit code 2 (tracebacks only with ``--debug``).

Each data case writes a small dataset in the publisher's format with one defect; the config, CLI and
checkpoint cases use the real development dataset and one tiny trained run.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from genrec.cli import main
from tests.conftest import ML1M_MOVIES, ML_CSV_MOVIES, ML_CSV_RATINGS, write_ml1m, write_ml_csv, zip_folder


def _error(capsys, argv: list[str]) -> str:
    """Run the command; it must exit 2 and print exactly one line on stderr, returned."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _csv_with(tmp_path: Path, line: int, text: str) -> Path:
    """ml-latest-small's csv format (fixture rows) with physical ``line`` replaced by ``text``."""
    lines = ML_CSV_RATINGS.splitlines()
    lines[line - 1] = text
    write_ml_csv(tmp_path / "ml-latest-small", ratings="\n".join(lines) + "\n")
    return tmp_path / "ml-latest-small" / "ratings.csv"


def _stats(root: Path, dataset: str = "ml-latest-small") -> list[str]:
    return ["data", "stats", dataset, "--data-dir", str(root), "--no-download"]


# -- data (finding 3, 4) ----------------------------------------------------------------------------

@pytest.mark.parametrize(("line", "text", "message"), [
    (3, "1,3,nan,964981247", "field 'rating' is 'nan', expected a finite number"),
    (3, "1,3,inf,964981247", "field 'rating' is 'inf', expected a finite number"),
    (8, "2,7,5.0,14457", "timestamp 14457 is before 1995-01-01 (1970-01-01): a line cut short, or not seconds "
                         "since 1970?"),
    (3, "1,3,4.0,964981247000", "timestamp 964981247000 looks like milliseconds (2000-07-30 in ms); expected "
                                "seconds since 1970"),
    (3, "1,3,4.0,4102444800", "timestamp 4102444800 is in the future (2100-01-01); expected seconds since 1970"),
    (3, "99999999999999999999,3,4.0,964981247", "field 'userId' is 99999999999999999999, which does not fit in a "
                                                "64-bit integer"),
    (3, "1,3,4.0,99999999999999999999", "field 'timestamp' is 99999999999999999999, which does not fit in a "
                                        "64-bit integer"),
    (3, "1,3,4.0", "expected 4 ','-separated fields, got 3: '1,3,4.0'"),
    (3, "1,3,6.0,964981247", "rating 6.0 outside [0.5, 5]"),
])
def test_a_bad_ratings_line_is_named_with_file_line_and_value(tmp_path, capsys, line, text, message):
    path = _csv_with(tmp_path, line, text)
    assert _error(capsys, _stats(tmp_path)) == f"genrec: error: {path}:{line}: {message}"


def test_text_that_is_not_utf8_is_named(tmp_path, capsys):
    folder = write_ml_csv(tmp_path / "ml-latest-small")
    (folder / "movies.csv").write_bytes(ML_CSV_MOVIES.replace("Heat", "H\xe9at").encode("latin-1"))
    assert _error(capsys, _stats(tmp_path)) == f"genrec: error: {folder / 'movies.csv'}:4: byte 0xe9 is not valid utf-8"


def test_a_utf8_movies_dat_is_not_read_as_garbled_latin1(tmp_path, capsys):
    folder = write_ml1m(tmp_path / "ml-1m")
    (folder / "movies.dat").write_bytes(ML1M_MOVIES.encode("utf-8"))
    assert _error(capsys, _stats(tmp_path, "ml-1m")) == (
        f"genrec: error: {folder / 'movies.dat'}:3: is UTF-8 ('30::Misérables, Les (1995)::Drama|Musical') but this "
        "format is latin-1; convert it with iconv -f utf-8 -t latin1")


def test_an_archive_that_is_not_a_zip_is_named(tmp_path, capsys):
    archive = tmp_path / "ml-latest-small" / "ml-latest-small.zip"
    archive.parent.mkdir()
    archive.write_bytes(b"<html>Service unavailable</html>")
    assert _error(capsys, _stats(tmp_path)) == (
        f"genrec: error: {archive}: not a readable zip archive (File is not a zip file); a truncated or corrupt "
        "download? Delete it to download it again")


def test_a_truncated_archive_is_named(tmp_path, capsys):
    archive = zip_folder(write_ml_csv(tmp_path / "src"), tmp_path / "ml-latest-small.zip", "ml-latest-small")
    archive.write_bytes(archive.read_bytes()[:-40])  # the end of the central directory is cut off
    assert _error(capsys, _stats(tmp_path)).startswith(f"genrec: error: {archive}: not a readable zip archive")


def test_an_archive_with_damaged_contents_is_named(tmp_path, capsys):
    src = write_ml_csv(tmp_path / "src")
    archive = tmp_path / "ml-latest-small.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as z:
        for f in sorted(src.iterdir()):
            z.write(f, f"ml-latest-small/{f.name}")
    data = bytearray(archive.read_bytes())
    at = data.index(b"1,1,4.0")
    data[at: at + 7] = b"9,9,9.9"  # same size, other bytes: the CRC no longer matches
    archive.write_bytes(bytes(data))
    assert _error(capsys, _stats(tmp_path)) == (
        f"genrec: error: {archive}!ml-latest-small/ratings.csv: cannot be read from the archive (Bad CRC-32 for "
        "file 'ml-latest-small/ratings.csv'); a truncated or corrupt download? Delete it to download it again")


def test_a_missing_dataset_offline_names_where_to_put_it(tmp_path, capsys):
    assert _error(capsys, _stats(tmp_path, "ml-20m")) == (
        f"genrec: error: {tmp_path / 'ml-20m'}: ml-20m not found; put ml-20m.zip or ratings.csv, movies.csv there "
        "(or allow downloading)")


# -- config (findings 4, 5) -------------------------------------------------------------------------

def _train(shared_data: Path, out: Path, *overrides: str) -> list[str]:
    return ["train", "--out-dir", str(out), "--data-dir", str(shared_data), "--set", "data.max_len=10",
            "model_args.d_model=8", "train.tensorboard=false", *overrides]


@pytest.mark.parametrize(("overrides", "message"), [
    (["train.epochs=0"], "--set train.epochs = 0: expected an integer >= 1"),
    (["train.max_steps=0"], "--set train.max_steps = 0: expected an integer >= 1 or null"),
    (["data.batch_size=0"], "--set data.batch_size = 0: expected an integer >= 1"),
    (["train.early_stop_mode=maxx"], "--set train.early_stop_mode = 'maxx': expected one of 'max', 'min'"),
    (["model_args.d_modl=8"], "--set model_args.d_modl: unknown field 'd_modl' in model_args; did you mean "
                              "'d_model'?"),
    (["train.lr=fast"], "--set train.lr = 'fast': expected a number > 0"),
])
def test_a_bad_setting_fails_before_data_is_read_and_writes_nothing(tmp_path, capsys, overrides, message):
    out = tmp_path / "run"
    # the data root does not exist: a setting error must come before any data is looked for
    assert _error(capsys, _train(tmp_path / "no-data", out, *overrides)) == f"genrec: error: {message}"
    assert not out.exists()


def test_a_config_file_error_names_the_file_and_line(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("model: dfgr\ntrain: {epochs: 3\n")
    assert _error(capsys, ["train", "--config", str(config)]).startswith(
        f"genrec: error: {config}: not valid YAML (line 3: ")


def test_settings_that_need_the_data_or_the_model_fail_before_training(tmp_path, capsys, shared_data):
    out = tmp_path / "run"
    assert _error(capsys, _train(shared_data, out, "data.prep.label_threshold=10")) == (
        "genrec: error: data.prep.label_threshold = 10: leaves no positive labels in ml-latest-small "
        "(ratings 0.5..5); expected a value in [0.5, 5)")
    assert _error(capsys, _train(shared_data, out, "model=hstu", "train.early_stop_metric=ndcg@10")) == (
        "genrec: error: train.early_stop_metric = 'ndcg@10': model hstu does not report ndcg@10; expected one of "
        "auc, gauc, logloss (or a sum with +, or one per task with ,)")
    assert not out.exists()


# -- CLI (finding 4) --------------------------------------------------------------------------------

def test_command_line_mistakes_are_one_line_with_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["recommend", "--checkpoint", "runs/x", "--user", "1", "--k", "-1"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == ("genrec recommend: error: argument --k: -1 is not a positive integer "
                                       "(expected 1 or more) (see genrec recommend --help)\n")


def test_debug_shows_the_traceback(tmp_path):
    argv = ["-m", "genrec.cli", "--debug", "train", "--set", "train.epochs=0"]
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "ConfigError" in proc.stderr
    proc = subprocess.run([sys.executable, *[a for a in argv if a != "--debug"]], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr == "genrec: error: --set train.epochs = 0: expected an integer >= 1\n"


# -- run folders and checkpoints (findings 1, 7, 8) -------------------------------------------------

TINY = ["train.max_steps=4", "train.checkpoint_every_steps=2", "data.eval_batch_size=512"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, shared_data) -> Path:
    """A finished SASRec run (4 steps, checkpoints at steps 2 and 4); tests copy it before changing it."""
    out = tmp_path_factory.mktemp("tiny") / "run"
    assert main(_train(shared_data, out, *TINY)) == 0
    return out


def _copy(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


def test_a_run_records_a_fingerprint_and_a_console_log_and_writes_strict_json(tiny_run):
    record = json.loads((tiny_run / "run.json").read_text())
    assert len(record["fingerprint"]) == 16 and record["settings"]["model"] == "sasrec"
    log = (tiny_run / "console.log").read_text()
    assert log.startswith(f"[run] {tiny_run} (new run, sasrec on ml-latest-small, fingerprint {record['fingerprint']})")
    assert "[train] epoch 0 step 4 valid" in log and log.rstrip().endswith("metrics.json")

    def no_constants(name):
        raise AssertionError(f"metrics.json holds a bare {name}")

    metrics = json.loads((tiny_run / "metrics.json").read_text(), parse_constant=no_constants)
    assert metrics["valid"]["gauc"] is None  # leave-one-out: one target per user, GAUC undefined


def test_another_setting_in_a_used_folder_is_refused_naming_it(tiny_run, tmp_path, capsys, shared_data):
    run = _copy(tiny_run, tmp_path)
    config = (run / "config.yaml").read_bytes()
    assert _error(capsys, _train(shared_data, run, *TINY, "train.lr=0.003")) == (
        f"genrec: error: {run} holds a run with other settings (train.lr 0.001 -> 0.003); pass --resume to continue "
        "it with the new ones, --overwrite to replace it, or choose another --out-dir")
    assert _error(capsys, _train(shared_data, run, *TINY, "model=hstu")) == (
        f"genrec: error: {run} holds another run (model sasrec -> hstu); a run cannot continue with other model: "
        "pass --overwrite to replace it, or choose another --out-dir")
    assert _error(capsys, _train(shared_data, run, *TINY)) == (
        f"genrec: error: {run} holds this run, finished (metrics.json); evaluate it with genrec eval --checkpoint "
        f"{run}, or pass --overwrite to train it again")
    assert (run / "config.yaml").read_bytes() == config  # a refused run changed nothing


def test_overwrite_replaces_the_run(tiny_run, tmp_path, capsys, shared_data):
    run = _copy(tiny_run, tmp_path)
    assert main([*_train(shared_data, run, *TINY, "model=hstu"), "--overwrite"]) == 0
    assert "test metrics (hstu" in capsys.readouterr().out
    assert json.loads((run / "run.json").read_text())["settings"]["model"] == "hstu"


def test_a_run_without_out_dir_gets_a_new_folder_printed_at_start(tmp_path, capsys, shared_data, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = [a for a in _train(shared_data, tmp_path, "train.max_steps=1") if a not in ("--out-dir", str(tmp_path))]
    assert main(argv) == 0
    first = capsys.readouterr().out.splitlines()
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == 1 and runs[0].name.startswith("sasrec-")
    assert any(line.startswith(f"[run] {Path('runs') / runs[0].name} (new run") for line in first)


def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(tiny_run, tmp_path, capsys, shared_data):
    run = _copy(tiny_run, tmp_path)
    (run / "metrics.json").unlink()  # as if killed before it finished
    latest = run / "checkpoints" / (run / "checkpoints" / "latest").read_text()
    (latest / "model.safetensors").write_bytes((latest / "model.safetensors").read_bytes()[:100])
    assert main(_train(shared_data, run, *TINY)) == 0
    out = capsys.readouterr().out
    assert f"[checkpoint] warning: {latest / 'model.safetensors'}: 100 bytes, expected " in out
    assert f"resumed from {run / 'checkpoints' / 'step-00000002'} (epoch 0, step 2)" in out


def test_eval_accepts_the_run_folder_a_checkpoint_folder_or_the_weights_file(tiny_run, capsys):
    newest = tiny_run / "checkpoints" / (tiny_run / "checkpoints" / "latest").read_text()  # step 4, saved twice: -r1
    assert newest.name == "step-00000004-r1"
    for path in (tiny_run, tiny_run / "best", tiny_run / "best" / "model.safetensors", newest,
                 newest / "model.safetensors"):
        assert main(["eval", "--checkpoint", str(path), "--split", "valid", "--json"]) == 0, path
        printed = capsys.readouterr().out.strip().splitlines()
        assert json.loads(printed[-1])["gauc"] is None  # strict JSON: undefined is null


@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_eval_on_a_damaged_weights_file_names_it(tiny_run, tmp_path, capsys, damage):
    run = _copy(tiny_run, tmp_path)
    weights = run / "best" / "model.safetensors"
    weights.write_bytes(b"" if damage == "empty" else weights.read_bytes()[:50])
    line = _error(capsys, ["eval", "--checkpoint", str(weights)])
    assert line.startswith(f"genrec: error: {weights}: not a readable safetensors file (")
    line = _error(capsys, ["eval", "--checkpoint", str(run)])
    size = weights.stat().st_size
    assert line.startswith(f"genrec: error: {weights}: {size} bytes, expected ")
