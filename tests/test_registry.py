"""One registry: the package root does not import the experiments; analysis models build lazily; one tiny name."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import mambaout
from mambaout.cli import COMMANDS, main
from mambaout.models.variants import get_variant, list_aliases

CLI = Path(mambaout.__file__).parent / "cli"


def test_package_root_does_not_import_analysis():
    code = "import sys, mambaout; mambaout.list_models(); print('mambaout.analysis' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "False"


def test_analysis_models_are_registered_by_name_and_built_on_demand():
    analysis = mambaout.list_models(group="analysis")
    assert {"vit_tiny_deit", "vit_small_deit_causal", "mambaout_pico_ssm", "mambaout_test_ssm"} <= set(analysis)
    assert not set(analysis) & set(mambaout.list_models(group="mambaout"))
    variant, _ = get_variant("vit_tiny_deit_causal")
    assert variant.builder == "mambaout.models.vit:VisionTransformer"
    model = mambaout.create_model("vit_tiny_deit_causal", num_classes=3)
    assert type(model).__module__ == "mambaout.models.vit" and model.causal


def test_pico_is_an_alias_of_test_and_not_listed_twice():
    assert list_aliases() == {"mambaout_pico": "mambaout_test"}
    assert get_variant("mambaout_pico")[0] is get_variant("mambaout_test")[0]
    assert "mambaout_pico" not in mambaout.list_models()
    assert mambaout.create_model("mambaout_pico").model_name == "mambaout_test"


def test_models_command_lists_families_first_and_analysis_apart(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    families, _, analysis = out.partition("analysis models")
    assert "mambaout_femto" in families and "mambaout_base_plus_rw" in families and "vit_" not in families
    assert "vit_small_deit_causal" in analysis and "mambaout_pico_ssm" in analysis and "mambaout_femto" not in analysis
    assert "mambaout_pico = mambaout_test" in analysis


def _imports(path: Path, package: str) -> set[str]:
    """Every module `path` imports, absolute or relative, at the top or inside a function."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # from .common import x / from . import predict
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)  # from mambaout.cli import predict
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def test_commands_do_not_import_each_other():
    modules = {module for module, _ in COMMANDS.values()}
    checked = set()
    for path in CLI.glob("*.py"):
        module = f"mambaout.cli.{path.stem}"
        if module not in modules:
            continue
        checked.add(module)
        others = {n for n in _imports(path, "mambaout.cli") if n in modules and n != module}
        assert not others, f"{path.name} imports {sorted(others)}; shared helpers go in cli/common.py"
    assert checked == modules  # every command's module was read


def test_import_reader_sees_every_form_of_import(tmp_path):
    code = "from mambaout.cli import predict\nfrom .train import x\ndef f():\n    import mambaout.cli.export\n"
    (tmp_path / "m.py").write_text(code)
    found = _imports(tmp_path / "m.py", "mambaout.cli")
    assert {"mambaout.cli.predict", "mambaout.cli.train", "mambaout.cli.export"} <= found


def test_models_command_at_a_size_a_vit_cannot_take(capsys):
    assert main(["models", "vit_tiny_*", "--img-size", "100", "--json"]) == 0  # 100 px is no multiple of 16
    rows = json.loads(capsys.readouterr().out)
    assert [r["macs_g"] for r in rows] == [None, None] and rows[0]["params_m"] == 5.72
