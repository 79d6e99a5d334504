"""Run folders never mix two runs: the plan for a folder, decided before anything is written."""

from __future__ import annotations

import re

import pytest

from genrec.config import load
from genrec.train.run_folder import RunFolder, RunFolderError, default_path, record


def _record(*overrides: str, digest: str = "data-1") -> dict:
    return record(load(None, list(overrides)), digest)


def _claimed(tmp_path, *overrides: str) -> RunFolder:
    folder = RunFolder(tmp_path / "run")
    rec = _record(*overrides)
    folder.claim(rec, folder.plan(rec, "auto"), "model: sasrec\n")
    return folder


def test_an_absent_or_empty_folder_is_a_new_run_and_plan_writes_nothing(tmp_path):
    folder = RunFolder(tmp_path / "run")
    assert folder.plan(_record(), "auto").action == "new"
    assert not (tmp_path / "run").exists()
    (tmp_path / "run").mkdir()
    assert folder.plan(_record(), "auto").action == "new"
    with pytest.raises(RunFolderError, match="nothing to resume"):
        folder.plan(_record(), "resume")


def test_the_same_run_resumes(tmp_path):
    folder = _claimed(tmp_path, "train.lr=0.01")
    assert folder.plan(_record("train.lr=0.01"), "auto").action == "resume"


def test_settings_that_do_not_change_the_computation_are_not_compared(tmp_path):
    folder = _claimed(tmp_path)
    same = _record("train.progress=false", "data.data_dir=/elsewhere", "data.num_workers=2", "train.out_dir=x")
    assert folder.plan(same, "auto").action == "resume"


def test_changed_training_settings_are_refused_naming_the_keys_unless_resume(tmp_path):
    folder = _claimed(tmp_path, "train.lr=0.01")
    changed = _record("train.lr=0.003", "train.epochs=9")
    with pytest.raises(RunFolderError, match=re.escape(
            f"{tmp_path / 'run'} holds a run with other settings (train.epochs 30 -> 9, train.lr 0.01 -> 0.003); "
            "pass --resume to continue it with the new ones, --overwrite to replace it, or choose another --out-dir")):
        folder.plan(changed, "auto")
    plan = folder.plan(changed, "resume")
    assert plan.action == "resume" and plan.changed == ["train.epochs", "train.lr"]


@pytest.mark.parametrize(("override", "key"), [("model=hstu", "model"), ("model_args.d_model=8", "model_args.d_model"),
                                                ("data.max_len=50", "data.max_len"), ("train.seed=3", "train.seed")])
def test_another_model_data_or_seed_cannot_continue_even_with_resume(tmp_path, override, key):
    folder = _claimed(tmp_path)
    for mode in ("auto", "resume"):
        with pytest.raises(RunFolderError, match=f"cannot continue with other {re.escape(key)}: pass --overwrite"):
            folder.plan(_record(override), mode)
    assert folder.plan(_record(override), "overwrite").action == "overwrite"


def test_other_data_files_are_another_run(tmp_path):
    folder = _claimed(tmp_path)
    with pytest.raises(RunFolderError, match="data.source_digest"):
        folder.plan(_record(digest="data-2"), "auto")


def test_a_finished_run_is_not_trained_again_silently(tmp_path):
    folder = _claimed(tmp_path)
    (tmp_path / "run" / "metrics.json").write_text("{}")
    with pytest.raises(RunFolderError, match="holds this run, finished .*genrec eval --checkpoint"):
        folder.plan(_record(), "auto")


def test_a_folder_of_other_files_is_refused_and_overwrite_removes_only_genrec_files(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    (run / "train_log.csv").write_text("step\n1\n")
    folder = RunFolder(run)
    with pytest.raises(RunFolderError, match="not a genrec run folder .*notes.txt"):
        folder.plan(_record(), "auto")
    plan = folder.plan(_record(), "overwrite")
    folder.claim(_record(), plan, "model: sasrec\n")
    assert (run / "notes.txt").read_text() == "mine" and not (run / "train_log.csv").exists()
    assert (run / "run.json").is_file() and (run / "config.yaml").is_file()


def test_default_folders_are_new_per_run(tmp_path):
    first = default_path("dfgr", tmp_path)
    assert re.fullmatch(r"dfgr-\d{8}-\d{6}", first.name)
    first.mkdir()
    assert default_path("dfgr", tmp_path) != first
