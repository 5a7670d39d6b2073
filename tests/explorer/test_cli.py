"""The command line, in-process: help texts, search output, clear errors."""

import pytest

from explorer.cli import build_parser, main


@pytest.mark.parametrize("command", [["corpus", "build"], ["serve"], ["search"], ["run"], ["replay"], ["demo"],
                                     ["daemon"], ["status"], ["plan"]])
def test_every_command_explains_itself(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args([*command, "--help"])
    assert exit_.value.code == 0
    assert len(capsys.readouterr().out.splitlines()) > 5


def test_search_prints_ranked_results_with_truth(small_corpus, capsys):
    assert main(["search", "sneakers", "--corpus", str(small_corpus.root), "-n", "5", "--truth"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 5 and lines[0].lstrip().startswith("1 ")
    assert sum("[fashion-mnist:" in line for line in lines) >= 4


def test_missing_corpus_is_a_clear_error(tmp_path, capsys):
    assert main(["search", "boot", "--corpus", str(tmp_path)]) == 2
    assert "explorer corpus build" in capsys.readouterr().err


def test_bad_override_is_a_clear_error(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("iterations: 1\n")
    assert main(["run", str(config), "--set", "iterations"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err
