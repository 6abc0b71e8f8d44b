"""The command line as a whole: every verb is listed and documents itself."""

import subprocess
import sys

import pytest

from moesim.cli import VERBS, build_parser, main


def test_every_reserved_verb_is_implemented():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "verb")
    assert sorted(subparsers.choices) == sorted(VERBS)


def test_top_level_help_lists_every_verb():
    out = subprocess.run([sys.executable, "-m", "moesim", "--help"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    for verb in VERBS:
        assert verb in out.stdout


@pytest.mark.parametrize("verb", VERBS)
def test_verb_help_explains_each_option(verb, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([verb, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "verb").choices[verb]
    for action in sub._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, f"moesim {verb} {action.option_strings[0]} has no help text"
    assert text.strip()


def test_unknown_verb_is_a_usage_error():
    with pytest.raises(SystemExit) as exit_info:
        main(["no-such-verb"])
    assert exit_info.value.code == 2
