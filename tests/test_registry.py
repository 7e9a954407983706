"""One registry: the package root does not import the experiments; analysis models build lazily; one tiny name."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import mambaout
from mambaout.cli import main
from mambaout.models.variants import get_variant, list_aliases

COMMANDS = Path(mambaout.__file__).parent / "commands"


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


def test_commands_do_not_import_each_other():
    for path in COMMANDS.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "mambaout.cli":
                names = [f"{node.module}.{a.name}" for a in node.names]  # from mambaout.cli import predict
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                if name.startswith("mambaout.cli.") and name != "mambaout.cli.common":
                    raise AssertionError(f"{path.name} imports {name}; shared helpers go in commands/common.py")


def test_models_command_at_a_size_a_vit_cannot_take(capsys):
    assert main(["models", "vit_tiny_*", "--img-size", "100", "--json"]) == 0  # 100 px is no multiple of 16
    rows = json.loads(capsys.readouterr().out)
    assert [r["macs_g"] for r in rows] == [None, None] and rows[0]["params_m"] == 5.72
