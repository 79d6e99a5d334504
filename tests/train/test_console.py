"""Training output: plain progress lines off a terminal, a bar on one, everything kept in console.log."""

from __future__ import annotations

from genrec.train.console import Console, Progress


def test_lines_logged_before_the_folder_exists_reach_the_file(tmp_path):
    printed = []
    console = Console(printed.append)
    console("[data] prepared")
    console.attach(tmp_path / "console.log")
    console("[run] started")
    console.keep("only in the file")
    assert printed == ["[data] prepared", "[run] started"]
    assert (tmp_path / "console.log").read_text() == "[data] prepared\n[run] started\nonly in the file\n"


def test_off_a_terminal_progress_is_a_plain_periodic_line_with_loss_rate_and_eta(tmp_path):
    printed = []
    console = Console(printed.append)
    progress = Progress(console, "epoch 0", 0, 4, enabled=True, every_s=0.0, terminal=False)
    for _ in range(2):
        progress.step(100, 0.5)
    progress.close()
    assert len(printed) == 2
    assert printed[1].startswith("[train] epoch 0 step 2/4 (50%) loss 0.5000 ") and " events/s eta " in printed[1]


def test_on_a_terminal_the_lines_go_to_the_log_only(tmp_path):
    printed = []
    console = Console(printed.append)
    console.attach(tmp_path / "console.log")
    progress = Progress(console, "epoch 0", 0, 2, enabled=True, every_s=0.0, terminal=True)
    progress.step(10, 0.25)
    progress.close()
    assert printed == [] and "[train] epoch 0 step 1/2" in (tmp_path / "console.log").read_text()


def test_progress_off_prints_nothing(tmp_path):
    printed = []
    progress = Progress(Console(printed.append), "epoch 0", 0, 2, enabled=False, every_s=0.0, terminal=False)
    progress.step(10, 0.25)
    assert printed == []
