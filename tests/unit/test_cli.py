"""The `crystallab` entry point: every command is registered by the module the lazy table names."""

from __future__ import annotations

import subprocess
import sys

import pytest

from engine import cli


def test_every_command_is_registered_by_its_module():
    parser = cli.build_parser(None)  # imports every command module
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(sub.choices) == set(cli.COMMANDS)
    for name in cli.COMMANDS:
        # the real module registers a parser that sets `func`; a stub would not
        defaults = sub.choices[name]._defaults
        nested = [a for a in sub.choices[name]._actions if getattr(a, "choices", None)]
        assert defaults.get("func") or nested, f"{name} registers no handler"


def test_help_lists_commands_without_importing_torch():
    code = "import sys; from engine import cli; cli.main(['--help'])"
    out = subprocess.run([sys.executable, "-c", code + ""], capture_output=True, text=True)
    assert "sweep" in out.stdout and "dashboard" in out.stdout
    probe = "import sys; from engine import cli\ntry:\n    cli.main(['--help'])\nexcept SystemExit: pass\nprint('torch' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert res.stdout.strip().endswith("False")


def test_unknown_command_is_refused(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["frobnicate"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_user_error_prints_one_line_and_exits_2(capsys, tmp_path):
    missing = tmp_path / "nope.cif"
    code = cli.main(["cif", "canonicalize", str(missing)])
    assert code == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "Traceback" not in err


def test_corpus_size_below_one_names_the_flag(capsys):
    assert cli.main(["data", "corpus", "--out", "never", "--n", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --n 0") and "builtin:" not in err  # the flag, not the source syntax


def test_dashboard_warns_when_it_listens_beyond_this_machine():
    from engine.app.dashboard import address_warning

    for loopback in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        assert address_warning(loopback) is None
    for open_to_all in ("0.0.0.0", "::", "192.168.1.20", "lab.example.org"):
        assert "anyone who can reach it can use the lab" in address_warning(open_to_all)
