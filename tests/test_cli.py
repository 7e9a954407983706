import json
import subprocess
import sys

from mambaout.cli import main


def test_models_table(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "mambaout_femto" in out and "7.30" in out and "1.16" in out and "82.7" in out


def test_models_json_filter(capsys):
    assert main(["models", "*_rw", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["model"] for r in rows][-1] == "mambaout_base_plus_rw" and rows[-1]["params_m"] == 101.66


def test_console_script_unknown_command():
    r = subprocess.run([sys.executable, "-m", "mambaout", "frobnicate"], capture_output=True, text=True)
    assert r.returncode == 2 and "unknown command 'frobnicate'" in r.stderr
