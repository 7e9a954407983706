"""Every command in README.md and docs/*.md runs as written, or at least names only options its command has.

Shell commands are read from the code fences (continuation lines joined, comments dropped, `$VAR`s set earlier in
the block expanded, `[--opt]` read as an optional `--opt`). Each one that can run on a CPU in seconds without the
network is run, as written, in document order, in a fresh folder per page whose `../shared/data` is the shared
test data; training is capped through MAMBAOUT_MAX_EPOCHS / MAMBAOUT_MAX_STEPS in the environment, never by
editing the command. Every command, and every `mambaout ...` or `python SCRIPT.py ...` written in inline code in the
running text, has its options checked against its own `--help`: `mambaout CMD`'s, `mambaout detect|segment
ACTION`'s, or the repository script's (`benchmarks/*.py`, `demo/app.py`). Python snippets run, each in
its own test after the commands above it on its page, where their code (not their comments) needs neither the
network nor files the page does not make; every snippet is compiled and its `mambaout.*` names looked up.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import io
import itertools
import json
import os
import re
import runpy
import shlex
import shutil
import subprocess
import sys
import tokenize
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]  # new pages (docs/dense.md, ...) join by themselves
FENCE = re.compile(r"^\s*(`{3,}|~{3,})(.*)$")
SHELL_LANGS = ("bash", "sh", "shell", "console", "")

# what a command needs that a test cannot give: a reason, found by a pattern in the command
NOT_RUN = [
    (r"^(pip|torchrun|srun)\b|\bpip install\b", "installs or launches many processes"),
    (
        r"(^|\s)(DIR|DIR_OR_TAR|TRAIN\.tar|VAL\.tar|a\.safetensors|b\.safetensors|best\.safetensors)(\s|$)",
        "placeholder",
    ),
    (r"(?<![\w.])/data/|ORG/NAME|node0\.example|\$OUT\b", "placeholder"),  # /data/imagenet, not ../shared/data/
    (r"--pretrained\b|pretrained=True|hf-hub:", "downloads published weights"),
    (r"--device cuda|--data-pipeline gpu|imagenette-h100|--recipe mambaout-|benchmarks/gpu_check", "needs a GPU"),
    (r"^mambaout demo\b|demo/app\.py", "serves until stopped"),
    (
        r"^mambaout (benchmark|data-bench|kernels --aot)|benchmarks/(cpu_check|inference_cpu|dense_cpu)",
        "a benchmark (minutes)",
    ),
    (r"^for |^flock ", "a loop of full runs or a lock for timing"),
    (r"python -m pytest", "the test suite itself"),
    (r"^mambaout flops\s*$|mambaout\.analysis\.compare", "every model, or a timing (minutes on 2 cores)"),
    (
        r"femto\.onnx|m-int8\.onnx|my-mambaout|runs/(finetune|pretrain)/|preds\.json",
        "reads what a command not run here writes",
    ),
    (r"imagenet-sample-1k-112\.tar|make_finetune_set|/tmp/(animals|sample|in10)", "the 1k-class sample (minutes)"),
]
# commands that read published weights unless given a file
NEEDS_WEIGHTS = re.compile(r"^mambaout (predict|export|validate)\b(?!.*(--checkpoint|--random-weights))")


@dataclass
class Snippet:
    page: Path
    line: int
    lang: str
    text: str

    def __str__(self) -> str:
        return f"{self.where}: {self.text}"

    @property
    def where(self) -> str:
        page = self.page.relative_to(ROOT) if self.page.is_relative_to(ROOT) else self.page.name
        return f"{page}:{self.line}"


def fences(page: Path) -> tuple[list[Snippet], bool]:
    """The page's code blocks, and whether a fence was left open at the end."""
    blocks, body, lang, start = [], None, "", 0
    for i, line in enumerate(page.read_text().splitlines(), 1):
        m = FENCE.match(line)
        if m and body is None:
            body, lang, start = [], m.group(2).strip(), i
        elif m and body is not None and not m.group(2).strip():
            blocks.append(Snippet(page, start, lang, "\n".join(body)))
            body = None
        elif body is not None:
            body.append(line)
    return blocks, body is not None


def shell_commands(block: Snippet) -> list[Snippet]:
    """One Snippet per command line: continuations joined, comments dropped, `$VAR`s of the block expanded."""
    out, env = [], {}
    lines = block.text.replace("\\\n", " ").splitlines()
    for offset, line in enumerate(lines):
        try:
            words = shlex.split(line, comments=True)
        except ValueError:
            words = line.split()
        if not words:
            continue
        if len(words) == 1 and re.fullmatch(r"[A-Z_]+=.*", words[0]):
            key, _, value = words[0].partition("=")
            env[key] = value
            continue
        text = " ".join(shlex.quote(w) if " " in w or "{" in w else w for w in words)
        for key, value in env.items():
            text = text.replace(f"${key}", value)
        out.append(Snippet(block.page, block.line + 1 + offset, "bash", text))
    return out


def all_snippets():
    shell, python = [], []
    for page in PAGES:
        blocks, _ = fences(page)
        for b in blocks:
            if b.lang == "python":
                python.append(b)
            elif b.lang in SHELL_LANGS and re.search(
                r"^\s*(mambaout|python|torchrun|srun|flock|pip|for|mkdir)\b", b.text, re.M
            ):
                shell.extend(shell_commands(b))
    return shell, python


SHELL, PYTHON = all_snippets()

INLINE_CODE = re.compile(r"(?<!`)`([^`]+)`(?!`)")
# commands written in the running text: `mambaout export --format hf DIR`, `python benchmarks/cpu_matmul.py ...`
INLINE_COMMAND = re.compile(
    r"^(?:flock \S+ )?(?:(?:python -m mambaout(?:\.analysis\.compare)?|mambaout)(?=\s|$)(?! [\w-]+:)"  # not a printed line
    r"|python \S+\.py(?=\s|$)|benchmarks/\S+\.sh(?=\s|$))"
    r"|^torchrun\b.*\s-m mambaout\s"
)


def inline_commands(page: Path) -> list[Snippet]:
    """The commands in the page's inline code outside fences; a span may wrap onto the next line of its paragraph."""
    out, paragraph, fence = [], [], False

    def flush():
        if paragraph:
            text = "\n".join(line for _, line in paragraph)
            for m in INLINE_CODE.finditer(text):
                command = " ".join(m.group(1).split())
                if INLINE_COMMAND.match(command):
                    out.append(Snippet(page, paragraph[0][0] + text.count("\n", 0, m.start()), "inline", command))
        paragraph.clear()

    for i, line in enumerate(page.read_text().splitlines(), 1):
        m = FENCE.match(line)
        if m and (not fence or not m.group(2).strip()):  # the same opening and closing rule as fences()
            flush()
            fence = not fence
        elif not fence:
            if not line.strip() or line.lstrip().startswith("|"):  # a blank line or a table row ends a paragraph
                flush()
            if line.strip():
                paragraph.append((i, line))
            if line.lstrip().startswith("|"):  # a table row is a paragraph of its own
                flush()
    flush()
    return out


INLINE = [c for page in PAGES for c in inline_commands(page)]


def python_code(text: str) -> str:
    """A snippet without its comments: `# pretrained=True for ImageNet weights` is a hint, not a download."""
    tokens = tokenize.generate_tokens(io.StringIO(text).readline)
    return tokenize.untokenize(t for t in tokens if t.type != tokenize.COMMENT)


def why_not_run(text: str) -> str | None:
    """What keeps a command (or a Python snippet's code, comments left out) from running here; None: it runs."""
    for pattern, reason in NOT_RUN:
        if re.search(pattern, text):
            return reason
    if NEEDS_WEIGHTS.search(text):
        return "downloads published weights"
    return None


# --- fences ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_code_fences_are_balanced(page):
    """An unclosed fence swallows the rest of the page into one code block."""
    _, unclosed = fences(page)
    assert not unclosed, f"{page.name}: a code fence is never closed"
    blocks, _ = fences(page)
    for b in blocks:  # a block holding Markdown headings or tables is a fence that closed too late
        assert not re.search(r"^#{2,3} [A-Z]|^\| --- \|", b.text, re.M), f"{b.page.name}:{b.line}: prose inside a fence"


# --- options against --help -----------------------------------------------------------------------------------------


def _options(argv: list[str]) -> set[str]:
    """The option strings `--help` of a command lists."""
    from mambaout.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), pytest.raises(SystemExit):
        if argv[0] == "mambaout.analysis.compare":
            from mambaout.analysis import compare

            compare.main(["--help"])
        else:
            main([*argv, "--help"])
    return _help_options(buf.getvalue())


def _mambaout_argv(text: str) -> list[str] | None:
    """The argv after `mambaout`/`python -m mambaout` (or `-m mambaout.analysis.compare`) in a command, else None."""
    m = re.search(r"(?:^|\s)(?:python -m |-m )?(mambaout(?:\.analysis\.compare)?)\s+(.*)$", text)
    if not m or (m.group(1) == "mambaout" and text.lstrip().startswith("python -c")):
        return None
    rest = re.split(r"\s(?:\||>|&&|;)\s", m.group(2))[0]
    words = [w.strip("[]") for w in shlex.split(rest)]
    return ([m.group(1)] if m.group(1) != "mambaout" else []) + words


def _used_options(words: list[str]) -> set[str]:
    return {w.split("=")[0] for w in words if re.match(r"--?[A-Za-z]", w)}


def _script_calls(text: str) -> list[tuple[str, list[str]]]:
    """(script, its arguments) for each `python SCRIPT.py ...` in a command, up to a pipe, redirect or `&&`."""
    words, calls = shlex.split(text), []
    for i, word in enumerate(words):
        if word.endswith(".py") and i and words[i - 1] == "python":
            args = []
            for arg in words[i + 1 :]:
                if arg in ("|", "||", "&&", ";") or arg.startswith(">"):
                    break
                args.append(arg)
            calls.append((word, args))
    return calls


@functools.cache
def _script_options(script: str) -> frozenset[str]:
    """The option strings a repository script's `--help` lists. Run in this interpreter (runpy, as `python SCRIPT
    --help` would run it): the torch, timm and mambaout imports at its top are then already loaded, where a fresh
    process took 4-11 s per script on the 2 shared cores."""
    buf, argv = io.StringIO(), sys.argv
    sys.argv = [str(ROOT / script), "--help"]
    try:
        with contextlib.redirect_stdout(buf):
            runpy.run_path(str(ROOT / script), run_name="__main__")
    except SystemExit as e:
        assert e.code in (0, None), f"{script} --help exited {e.code}"
    except Exception as e:  # a script without --help (make_finetune_set.py reads sys.argv itself)
        raise AssertionError(f"{script} --help failed ({type(e).__name__}: {e}): it takes no options") from e
    finally:
        sys.argv = argv
    assert "usage:" in buf.getvalue(), f"{script} --help printed no usage"
    return frozenset(_help_options(buf.getvalue()))  # cached: not to be changed by a caller


def _help_options(text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", text))


# repository paths a command names (scripts, result files); `(?<!...)`: not runs/demo/ or ../benchmarks/
REPO_PATH = re.compile(r"(?<![\w./-])((?:benchmarks|demo)/[\w./-]*)")


@pytest.mark.parametrize("cmd", SHELL + INLINE, ids=str)
def test_documented_options_exist(cmd):
    """Each command, in a fence or in the running text, names only files the repository has and options its own
    `--help` lists: `mambaout CMD`'s, `mambaout detect ACTION`'s (not another action's), or a script's."""
    check_options(cmd)


def check_options(cmd: Snippet) -> None:
    for path in REPO_PATH.findall(cmd.text):
        assert (ROOT / path).exists(), f"{cmd}: {path} is not in the repository"
    for script, args in _script_calls(cmd.text):
        assert (ROOT / script).is_file(), f"{cmd}: {script} is not in the repository"
        used = _used_options(args)
        if used:
            known = _script_options(script)
            assert used <= known, f"{cmd}: {sorted(used - known)} not among the options of python {script} --help"
    argv = _mambaout_argv(cmd.text)
    if argv is None:
        return
    if argv[0].startswith("-"):  # `mambaout --help`
        assert argv[0] in ("-h", "--help", "-V", "--version"), f"{cmd}: mambaout has no option {argv[0]}"
        return
    if re.fullmatch(r"<[\w-]+>", argv[0]):  # `mambaout <command>`: any command
        return
    from mambaout.cli import COMMANDS
    from mambaout.cli.dense import ACTIONS

    assert argv[0] in COMMANDS or argv[0] == "mambaout.analysis.compare", f"{cmd}: no command {argv[0]!r}"
    command = argv[:1]
    if argv[0] in ("detect", "segment"):  # each action has its own options
        if len(argv) > 1 and not argv[1].startswith("-"):
            assert argv[1] in ACTIONS, f"{cmd}: mambaout {argv[0]} has no action {argv[1]!r} ({', '.join(ACTIONS)})"
            command = argv[:2]
        else:
            assert not _used_options(argv[1:]) - {"-h", "--help"}, f"{cmd}: options without an action ({ACTIONS})"
    known = _options(command)
    used = _used_options(argv[len(command) :])
    assert used <= known, f"{cmd}: {sorted(used - known)} not among the options of mambaout {' '.join(command)} --help"


# --- running them ---------------------------------------------------------------------------------------------------


def _workdir(tmp_path: Path, shared: Path | None) -> Path:
    """A fresh folder per page: `../shared/data` the shared test data, a photo as `cat.jpg` and a `photos/` folder."""
    work = tmp_path / "work"
    if shared is not None:
        (tmp_path / "shared").mkdir()
        (tmp_path / "shared" / "data").symlink_to(shared)
    photos = work / "photos"
    photos.mkdir(parents=True)
    examples = sorted((ROOT / "src" / "mambaout" / "examples").glob("*.jpg"))
    shutil.copy(examples[0], work / "cat.jpg")
    for e in examples[1:3]:
        shutil.copy(e, photos / e.name)
    return work


def _env(work: Path) -> dict:
    env = dict(os.environ, MAMBAOUT_MAX_EPOCHS="1", MAMBAOUT_MAX_STEPS="2", MAMBAOUT_CACHE=str(work / ".cache"))
    env["MAMBAOUT_MIRROR"] = "http://127.0.0.1:9"  # nothing listens there: a command that downloads fails fast
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    bin_dir = work.parent / "bin"  # `mambaout` and `python` are this checkout's, whatever the PATH holds
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "mambaout").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m mambaout "$@"\n')
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env["PATH"] = os.pathsep.join([str(bin_dir), env["PATH"]])
    import torch  # loaded by conftest.py

    env.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))  # the test run's: 1 per pytest-xdist worker
    return env


def _uses_shared_data(text: str) -> bool:
    return "../shared/data" in text or "imagenette" in text or "coco128" in text


README_IMAGENETTE = "mambaout train --recipe imagenette-cpu --data-train ../shared/data/"


def _run_page(page: Path, tmp_path: Path, shared: Path | None, upto: Snippet | None = None) -> list[str]:
    """Runs the page's runnable shell commands in order (with `shared`: only those on the shared data, else only
    those without it); returns what was run. Python snippets have their own test: with `upto`, one of the page's
    snippets, the commands and runnable snippets above it run first (it may read what they write), then it.
    Consecutive shell commands run through tests/docs_runner.py: one Python process for them all."""
    heavy = shared is not None
    work = _workdir(tmp_path, shared)
    env = _env(work)
    ran, commands = [], []
    blocks, _ = fences(page)
    trains_it = any(c.page == page and c.text.startswith(README_IMAGENETTE) for c in SHELL)
    if heavy and "runs/imagenette-cpu/" in page.read_text() and not trains_it:
        # a page that reads the Imagenette run the README trains: its reader ran the README's command first
        first = next(c for c in SHELL if c.page.name == "README.md" and c.text.startswith(README_IMAGENETTE))
        commands.append(first)
    for block in blocks:
        if block.lang == "python" and upto is None:
            continue
        items = shell_commands(block) if block.lang in SHELL_LANGS else [block] if block.lang == "python" else []
        for item in items:
            text = item.text
            code = python_code(text) if item.lang == "python" else text
            if why_not_run(code) or (_uses_shared_data(text) and not heavy) or (heavy and not _uses_shared_data(text)):
                continue
            if text in ran + [c.text for c in commands]:  # a page repeating a command (the README's `mambaout
                continue  # train`): a reader runs it once
            if item.lang == "python":
                ran += _run_commands(commands, work, env)
                commands = []
                argv = [sys.executable, "-c", text]
                proc = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True, timeout=600)
                assert proc.returncode == 0, (
                    f"{item}\nexit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
                )
                ran.append(text)
            elif re.match(r"(mambaout|python|mkdir|tar)\b", text):
                commands.append(item)
        if block == upto:  # fences() read the page again: equal, not the same object
            break
    return ran + _run_commands(commands, work, env)


def _run_commands(commands: list[Snippet], work: Path, env: dict) -> list[str]:
    """Runs shell commands in order in `work` through tests/docs_runner.py; asserts each exits 0."""
    if not commands:
        return []
    plan = work.parent / f"plan-{len(list(work.parent.glob('plan-*.json')))}.json"
    plan.write_text(json.dumps([c.text for c in commands]))
    runner = Path(__file__).with_name("docs_runner.py")
    proc = subprocess.run([sys.executable, str(runner), str(plan)], cwd=work, env=env, capture_output=True, text=True)
    done = Path(f"{plan}.out")
    codes = json.loads(done.read_text()) if done.is_file() else []
    for command, code in zip(commands, codes):
        if code:
            out, err = (stream.rpartition(f"\n=== {command.text}\n")[2] for stream in (proc.stdout, proc.stderr))
            raise AssertionError(f"{command}\nexit {code}\n{out[-2000:]}\n{err[-3000:]}")
    assert proc.returncode == 0 and len(codes) == len(commands), (
        f"docs_runner.py: exit {proc.returncode}\n{proc.stderr[-3000:]}"
    )
    return [c.text for c in commands]


@pytest.mark.heavy
@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_documented_commands_run(page, tmp_path):
    """The commands that need neither the shared data nor the network (the embedded digits, counts, configs)."""
    _run_page(page, tmp_path, None)


# dense.md's 19 coco128 commands: 102 s alone, 141 s beside the other worker's tests; the other pages under 25 s
LONG_PAGE = pytest.mark.timeout(900)


@pytest.mark.heavy
@pytest.mark.parametrize(
    "page", [pytest.param(p, marks=[LONG_PAGE] if p.name == "dense.md" else []) for p in PAGES], ids=lambda p: p.name
)
def test_documented_commands_on_shared_data_run(page, tmp_path, shared_data):
    """The commands on ../shared/data (Imagenette training capped to 1 epoch of 2 steps, validation, prediction)."""
    _run_page(page, tmp_path, shared_data)


@pytest.mark.heavy
@pytest.mark.parametrize("snippet", PYTHON, ids=lambda s: s.where)
def test_python_snippets_run(snippet, tmp_path, request):
    """Each snippet that needs neither the network nor files its page does not make runs as written, in a folder
    where the page's commands above it ran; the others say why not (their names are checked by the test below)."""
    reason = why_not_run(python_code(snippet.text))
    if reason:
        pytest.skip(f"{snippet.where} not run: {reason}; compiled and its mambaout names checked")
    shared = request.getfixturevalue("shared_data") if _uses_shared_data(snippet.text) else None
    ran = _run_page(snippet.page, tmp_path, shared, upto=snippet)
    assert ran and ran[-1] == snippet.text, f"{snippet.where} did not run"


@pytest.mark.parametrize("snippet", PYTHON, ids=lambda s: s.where)
def test_python_snippets_compile_and_name_real_things(snippet):
    """Every snippet parses, and every `mambaout.X` or `from mambaout.Y import Z` it uses exists."""
    import importlib

    tree = ast.parse(snippet.text)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mambaout"):
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name), f"{snippet}: {node.module} has no {alias.name}"
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "mambaout":
            import mambaout

            assert hasattr(mambaout, node.attr), f"{snippet}: mambaout has no {node.attr}"


def test_the_extraction_finds_the_commands():
    """The parser sees what a reader sees: the default job, the README's Python block, the flops lines."""
    texts = [c.text for c in SHELL]
    assert "mambaout train" in texts and any(t.startswith("mambaout flops --transformer") for t in texts)
    assert any("create_model" in p.text for p in PYTHON if p.page.name == "README.md")
    assert {why_not_run("mambaout predict cat.jpg"), why_not_run("mambaout demo")} == {
        "downloads published weights",
        "serves until stopped",
    }


def test_inline_commands_are_found_and_checked(tmp_path):
    """Commands in running text are extracted (a span may wrap a line; fences, printed lines and names of things
    are not commands), and the check fails on an option of another action, an unknown script option or file."""
    page = tmp_path / "page.md"
    page.write_text(
        "Run `mambaout export --format hf\nDIR` or `mambaout_femto` or `python -m mambaout.analysis`.\n"
        "| a | `mambaout detect train --steps 2` |\n\n"
        "It prints `mambaout predict: bf16 asked for`; see `flock /tmp/x.lock benchmarks/cpu_check.sh`.\n"
        "```bash\nmambaout train `mambaout models`\n```\n"
    )
    found = [(c.line, c.text) for c in inline_commands(page)]
    assert found == [
        (1, "mambaout export --format hf DIR"),
        (3, "mambaout detect train --steps 2"),
        (5, "flock /tmp/x.lock benchmarks/cpu_check.sh"),
    ]
    texts = [c.text for c in INLINE]
    assert "mambaout export --format hf DIR" in texts and any(t.startswith("mambaout data-bench --") for t in texts)
    for text, complaint in [
        ("mambaout detect train --score-threshold 0.3", r"'--score-threshold'\] not among .* detect train --help"),
        ("mambaout segment train --flip", r"'--flip'\] not among .* segment train --help"),  # validate's
        ("mambaout detect --steps 2", "options without an action"),
        ("mambaout detect fit", "has no action 'fit'"),
        ("python demo/app.py --share", r"'--share'\] not among .* demo/app.py --help"),
        ("python benchmarks/dense_cpu.py --model femto", r"'--model'\] not among .* benchmarks/dense_cpu.py --help"),
        ("python benchmarks/make_finetune_set.py --seed 1 a b", "takes no options"),
        ("flock /tmp/x.lock benchmarks/gpu_check.sh", "benchmarks/gpu_check.sh is not in the repository"),
    ]:
        with pytest.raises(AssertionError, match=complaint):
            check_options(Snippet(page, 1, "inline", text))
    check_options(Snippet(page, 1, "inline", "mambaout detect predict --score-threshold 0.3 --checkpoint w x.jpg"))


def test_python_snippets_are_judged_by_their_code_not_their_comments():
    """A pattern in a comment (dense.md's `# pretrained=True for ImageNet weights`) does not stop a snippet; the
    same words in code do. Fails if no snippet is left to run (they were all only compiled before)."""
    assert why_not_run(python_code('m = create_model("x", pretrained=True)')) == "downloads published weights"
    assert why_not_run(python_code('m = create_model("x")  # pretrained=True for ImageNet weights')) is None
    assert why_not_run(python_code('s = "# not a comment: pretrained=True"')) == "downloads published weights"
    runnable = [p for p in PYTHON if why_not_run(python_code(p.text)) is None]
    assert any(p.page.name == "dense.md" and "DenseBackbone(" in p.text for p in runnable), [p.where for p in PYTHON]


# --- the documentation agrees with itself and with the code ----------------------------------------------------------


def _doc_text() -> str:
    return "\n".join(p.read_text() for p in PAGES)


def test_torch_range_matches_the_pin():
    pin = re.search(r'"torch>=([\d.]+),<([\d.]+)"', (ROOT / "pyproject.toml").read_text())
    for claim in re.findall(r"any torch >= ([\d.]+)(?:, < ([\d.]+))?", _doc_text()):
        assert claim == pin.groups(), (
            f"the docs say torch >= {claim[0]}, < {claim[1] or '?'}; pyproject pins {pin.groups()}"
        )


RECIPE_DIRS = [ROOT / "src" / "mambaout" / "recipes", ROOT / "src" / "mambaout" / "dense" / "recipes"]
# a wall-time budget: "under 10 min", "within 10 minutes", "budget 20 min", "in 20 CPU-minutes"; not "in 4 min 14 s"
BUDGET = r"(?:under|within|budget:?|in) (\d+) (?:CPU-)?min(?:utes)?\b(?! \d+ s\b)"


def _recipe_header(path: Path) -> str:
    """The comment a recipe file opens with (command, hardware, wall time, top-1, why), as one line of text."""
    lines = path.read_text().splitlines()
    return " ".join(line.lstrip("#").strip() for line in itertools.takewhile(lambda s: s.startswith("#"), lines))


@pytest.mark.parametrize("recipe", ["imagenette-h100", "imagenette-cpu"])
def test_recipe_rows_state_the_recipes_size_and_epochs(recipe):
    """The docs' rows give the recipe's own size and epochs, and the docs and the recipe's header one budget, one
    measured wall time (within that budget) and one top-1."""
    import yaml

    path = RECIPE_DIRS[0] / f"{recipe}.yaml"
    cfg = yaml.safe_load(path.read_text())
    rows = [line for line in _doc_text().splitlines() if line.startswith(f"| `{recipe}` |")]
    assert rows
    for row in rows:
        px = re.search(r"(\d+) px", row)
        ep = re.search(r"(\d+) epochs", row)
        if px:
            assert int(px.group(1)) == cfg["img_size"], row
        if ep:
            assert int(ep.group(1)) == cfg["epochs"], row
    header = _recipe_header(path)
    in_header = set(re.findall(BUDGET, header))
    in_docs = set(re.findall(rf"{recipe}[^\n]*?{BUDGET}", _doc_text()))
    assert in_header, f"{path.name}: its header states no wall-time budget"
    assert len(in_header | in_docs) == 1, f"{recipe}: budgets of {in_docs} min in the docs, {in_header} in its header"
    measured = re.search(r"wall time: (\d+) min (\d+) s measured", header)
    if measured:
        wall, top1 = f"{measured[1]} min {measured[2]} s", re.search(r"top-1: +([\d.]+%) measured", header)[1]
        assert int(measured[1]) * 60 + int(measured[2]) <= int(in_header.pop()) * 60, f"{path.name}: over budget"
        for row in rows:
            if re.search(r"\d+ min \d+ s", row):
                assert wall in row, f"{row}\nthe header of {path.name} says {wall}"
            if re.search(r"\d+\.\d+%", row):
                assert top1 in row, f"{row}\nthe header of {path.name} says top-1 {top1}"


def test_timing_claims_name_the_cpu():
    """A time measured on '2 CPU cores' says which CPU (the machines behind the numbers here: AMD EPYC, Intel Xeon)."""
    named = re.compile(r"EPYC|Xeon")
    for page in PAGES:
        for i, line in enumerate(page.read_text().splitlines(), 1):
            if re.search(r"(\d+ (s|min)\b[^|]*on 2 (CPU )?cores|on 2 (CPU )?cores[^|]*\d+ (s|min)\b)", line):
                assert named.search(line), f"{page.name}:{i}: a timing without its CPU: {line.strip()}"
    for path in sorted(p for d in RECIPE_DIRS for p in d.glob("*.yaml")):  # and a recipe's header, measured on CPUs
        header = _recipe_header(path)
        if re.search(r"\bmeasured\b", header) and re.search(r"\bCPU cores\b", header):
            assert named.search(header), (
                f"{path.name}: a wall time measured on CPU cores, without the CPU: {header[:300]}"
            )


# what a page says is in a repository checkout only: "`benchmarks/` is not in the pip package", "`demo/app.py`
# exists only in a repository checkout" (the folder, or the very file the command uses)
REPO_ONLY = re.compile(r"`((?:benchmarks|demo)/[^`]*)`[^.`]*?(?:not in the pip package|only in a repository checkout)")


def test_pages_say_which_files_a_pip_install_lacks():
    """The wheel holds src/mambaout only (benchmarks/ and demo/ are beside it), so a page with a command that uses
    a benchmarks/ or demo/ path says that it needs a repository checkout."""
    assert 'where = ["src"]' in (ROOT / "pyproject.toml").read_text()  # the premise: packages come from src/ only
    missing = []
    for cmd in SHELL + INLINE:
        said = {m.group(1) for m in REPO_ONLY.finditer(" ".join(cmd.page.read_text().split()))}
        for path in REPO_PATH.findall(cmd.text):
            if not any(path == s or (s.endswith("/") and path.startswith(s)) for s in said):
                missing.append(f"{cmd.where}: {path} (the page never says `{path.split('/')[0]}/` is repository-only)")
    assert not missing, "\n".join(missing)


@pytest.mark.heavy
def test_demo_prints_no_share_advice(tmp_path):
    """`mambaout demo` starts with one line naming its address, without Gradio's "set `share=True` in `launch()`"
    (a command-line user cannot edit that call, and the demo makes no public links: docs/inference.md)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [sys.executable, "-m", "mambaout", "demo", "--model", "mambaout_test", "--random-weights"]
    env = _env(tmp_path / "work")
    proc = subprocess.Popen(
        [*argv, "--port", str(port)], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    printed = []
    try:
        for line in proc.stdout:  # the demo's own line comes after everything Gradio's launch() prints
            printed.append(line)
            if "(Ctrl+C to stop)" in line:
                break
    finally:
        proc.terminate()  # SIGTERM: the demo removes its upload folder and exits 0
        try:
            printed.append(proc.communicate(timeout=60)[0])
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    printed = "".join(printed)
    assert f"* Running on http://127.0.0.1:{port}/ (Ctrl+C to stop)" in printed, printed
    assert "share=True" not in printed and "public link" not in printed, printed
    assert proc.returncode == 0, printed
