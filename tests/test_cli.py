import json
import subprocess
import sys
import textwrap

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


def test_ctrl_c_while_starting_is_one_line_and_exit_130():
    """Ctrl-C while torch/timm are still being imported (seconds) ends at once with one line, no traceback and no
    C++ abort. The interrupt is sent from inside the import of timm, so it lands there on every machine."""
    code = textwrap.dedent(
        """
        import importlib.abc, os, signal, sys, time
        class Interrupt(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "timm":
                    os.kill(os.getpid(), signal.SIGINT)
                    time.sleep(5)
                return None
        sys.meta_path.insert(0, Interrupt())
        signal.signal(signal.SIGINT, signal.default_int_handler)
        from mambaout.cli import main
        sys.exit(main(["models"]))
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr == "mambaout models: interrupted while starting (Ctrl-C); nothing was written\n"
    light = subprocess.run(
        [sys.executable, "-c", "import sys, mambaout, mambaout.cli; print('torch' in sys.modules)"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert light.stdout.strip() == "False", "import mambaout must not load torch (the public names load on use)"


def test_benchmark_csv_appends_and_widens_to_new_columns(tmp_path):
    """`--csv` appends; rows with columns the file lacks rewrite it with the union, old rows keeping their values."""
    import csv

    from mambaout.cli.benchmark import write_csv

    path = tmp_path / "rows.csv"
    write_csv([dict(impl="a", img_per_s=1.5)], path)
    write_csv([dict(impl="b", img_per_s=2.5)], path)
    write_csv([dict(impl="c", img_per_s=3.5, rounds=2)], path)
    write_csv([dict(impl="d")], path)  # fewer columns: empty fields
    rows = list(csv.DictReader(path.open()))
    assert [(r["impl"], r["img_per_s"], r["rounds"]) for r in rows] == [
        ("a", "1.5", ""),
        ("b", "2.5", ""),
        ("c", "3.5", "2"),
        ("d", "", ""),
    ]
    assert path.read_text().splitlines()[0] == "impl,img_per_s,rounds"
