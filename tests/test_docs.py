"""The documented commands: every fenced bash and python block of README.md and docs/*.md.

Each block follows a marker line, `<!-- run: KIND -->` (KINDS below says what each kind needs);
a block without one, or a marker without a block, fails here. Every block is checked: bash blocks
with `bash -n`, python blocks compiled; every `h3pretrain` subcommand, option and `--set` key a
command uses exists (the CLI's own parser, the one `--help` prints, and the config's fields); every
`make` target exists in the Makefile; every `.venv/bin/` program and repository path a command
names exists. The `cpu` blocks then run (slow), in document order (README.md, then the guides by
name), in one temporary copy of the repository; see `workspace` for its data. A block passes when it
exits 0; the commands a `h3pretrain summary` prints are then run as printed too.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import corpus_docs

REPO = Path(__file__).resolve().parents[1]
README_LIMIT = 10_000
KINDS = {
    "cpu": "this repository and a CPU: the test runs it",
    "long": "a CPU, but minutes or more (the test suite, benchmarks, the synthetic tasks)",
    "gpu": "a CUDA GPU",
    "cluster": "SLURM, several GPUs, or data on a cluster",
    "download": "files from elsewhere (a released checkpoint, GPT-2's tokenizer, wheels)",
}
LANGS = {"bash": "shell", "sh": "shell", "shell": "shell", "python": "python"}
MARKER = re.compile(r"^<!-- run: ([a-z]+) -->$")
# the product's directories: a command argument starting with one of them names a file that must exist
REPO_DIRS = ("tests/", "launch/", "bench/", "h3pretrain/", "data_prep/", "kernels/", "docs/")


def doc_files() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


@dataclass
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    lang: str  # shell | python
    kind: str | None
    text: str

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


def parse(path: Path, text: str | None = None) -> tuple[list[Block], list[str]]:
    """The bash and python blocks of a Markdown file, and what is wrong with its markers."""
    lines = (path.read_text(encoding="utf-8") if text is None else text).splitlines()
    blocks, problems, i = [], [], 0
    where = lambda n: f"{path.name}:{n}"  # noqa: E731
    while i < len(lines):
        marker = MARKER.match(lines[i].strip())
        if marker and marker.group(1) not in KINDS:
            problems.append(f"{where(i + 1)}: unknown marker kind {marker.group(1)!r} (known: {', '.join(KINDS)})")
        if lines[i].startswith("```") and lines[i].strip() != "```":
            lang = lines[i][3:].strip().split()[0]
            end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), len(lines))
            before = MARKER.match(lines[i - 1].strip()) if i else None
            if lang in LANGS:
                kind = before.group(1) if before else None
                if kind is None:
                    problems.append(f"{where(i + 1)}: a ```{lang} block without a marker line before it "
                                    f"(<!-- run: KIND -->, KIND one of {', '.join(KINDS)})")
                blocks.append(Block(path, i + 1, LANGS[lang], kind, "\n".join(lines[i + 1:end]) + "\n"))
            elif before:
                problems.append(f"{where(i)}: a marker before a ```{lang} block (only bash and python blocks run)")
            i = end + 1
            continue
        if marker and not (i + 1 < len(lines) and lines[i + 1].startswith("```")):
            problems.append(f"{where(i + 1)}: a marker that no fenced block follows")
        i += 1
    return blocks, problems


def all_blocks() -> list[Block]:
    return [b for path in doc_files() for b in parse(path)[0]]


# --- the static checks ---------------------------------------------------------------------------

def commands(text: str) -> list[list[str]]:
    """The simple commands of a shell block as words (comments, redirections and operators dropped)."""
    out = []
    for line in text.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        words, skip = [], False
        for tok in lexer:
            if skip:
                skip = False
            elif tok and set(tok) <= set("<>"):
                skip = True  # a redirection and its target
            elif tok and set(tok) <= set(";&|()"):
                out.append(words)
                words = []
            else:
                words.append(tok)
        out.append(words)
    return [c for c in out if c]


def makefile_targets(root: Path) -> set[str]:
    done = subprocess.run(["make", "-pRrq", "-f", "Makefile", ":"], cwd=root, capture_output=True, text=True)
    return {m.group(1) for m in re.finditer(r"^([A-Za-z0-9][^:=#%\s]*):(?!=)", done.stdout, re.M)}


def _subparser(parser, name: str):
    actions = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    return actions[0].choices.get(name) if actions else None


def check_set(item: str) -> str | None:
    """What is wrong with a `--set section.key=value` (None when the config takes it)."""
    from h3pretrain.config import Config, apply_overrides
    from h3pretrain.errors import UserError

    if "$" in item:
        return None  # the shell fills it in
    try:
        apply_overrides(Config(), [item])
    except UserError as err:
        return str(err)
    return None


def check_h3pretrain(args: list[str]) -> list[str]:
    """Problems with an `h3pretrain ARGS` command line: its subcommand, options and --set items."""
    from h3pretrain.cli import build_parser

    parser, words = build_parser(), list(args)
    if not words or _subparser(parser, words[0]) is None:
        return [f"h3pretrain {' '.join(args)}: no such subcommand"]
    command = words.pop(0)
    parser = _subparser(parser, command)
    if command == "slurm":
        action = words.pop(0) if words else ""
        parser = _subparser(parser, action)
        if parser is None:
            return [f"h3pretrain slurm {action}: no such action"]
        command += " " + action
    problems = []
    for i, word in enumerate(words):
        if not word.startswith("--"):
            continue
        option, _, value = word.partition("=")
        if option not in parser._option_string_actions:
            problems.append(f"h3pretrain {command}: no option {option}")
        elif option == "--set" and command not in ("info", "import-h3"):
            problem = check_set(value or (words[i + 1] if i + 1 < len(words) else ""))
            if problem:
                problems.append(f"h3pretrain {command} --set: {problem}")
    return problems


def check_command(words: list[str], root: Path, targets: set[str]) -> list[str]:
    while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
        words = words[1:]  # VAR=value before a command
    if not words or words[0] in ("export", "cd"):
        return []
    problems = []
    program = words[0]
    if program.startswith(".venv/bin/") and not (root / program).exists():
        problems.append(f"{program}: no such program in .venv")
    for word in words[1:]:
        path = word.partition("=")[2] if word.startswith("--") else word
        if path.startswith(REPO_DIRS) and "$" not in path and not list(root.glob(path)):
            problems.append(f"{path}: no such file in the repository")
    if Path(program).name == "h3pretrain":
        problems += check_h3pretrain(words[1:])
    elif "h3pretrain.cli" in words and words[words.index("h3pretrain.cli") - 1] == "-m":
        problems += check_h3pretrain(words[words.index("h3pretrain.cli") + 1:])
    elif program == "make":
        for word in words[1:]:
            if word.startswith("SET="):
                problems += [f"make SET: {p}" for p in filter(None, map(check_set, word[4:].split()))]
            elif "=" not in word and not word.startswith("-") and word not in targets:
                problems.append(f"make {word}: no such target in the Makefile")
    return problems


def check_block(block: Block, root: Path = REPO, targets: set[str] | None = None) -> list[str]:
    """What is wrong with a block, before running it (empty: nothing)."""
    if block.lang == "python":
        try:
            compile(block.text, block.name, "exec")
        except SyntaxError as err:
            return [f"not Python: {err}"]
        return []
    done = subprocess.run(["bash", "-n", "-c", block.text], capture_output=True, text=True)
    if done.returncode:
        return [f"bash -n: {done.stderr.strip()}"]
    targets = makefile_targets(root) if targets is None else targets
    return [p for words in commands(block.text) for p in check_command(words, root, targets)]


def test_readme_is_short():
    size = len((REPO / "README.md").read_text(encoding="utf-8"))
    assert size <= README_LIMIT, f"README.md has {size:,} characters (at most {README_LIMIT:,}): move reference to docs/"


def test_every_link_leads_to_a_file():
    links = [(path, target) for path in doc_files()
             for target in re.findall(r"\]\(([^)#\s]+)[^)]*\)", path.read_text(encoding="utf-8"))
             if "://" not in target]
    assert len(links) > 20
    missing = [f"{path.relative_to(REPO)}: {target}" for path, target in links if not (path.parent / target).exists()]
    assert not missing, "\n".join(missing)


def test_every_block_is_marked():
    problems = [p for path in doc_files() for p in parse(path)[1]]
    assert not problems, "\n".join(problems)
    assert {b.kind for b in all_blocks()} >= {"cpu", "cluster", "gpu"}


def test_every_block_passes_the_static_checks():
    targets = makefile_targets(REPO)
    problems = [f"{b.name}: {p}" for b in all_blocks() for p in check_block(b, REPO, targets)]
    assert not problems, "\n".join(problems)


def test_the_checks_find_what_is_wrong():
    """Each check on a block made to fail it."""
    text = "\n".join([
        "<!-- run: cpu -->", "```bash", "echo fine", "```",
        "```bash", "echo unmarked", "```",
        "<!-- run: laptop -->", "```python", "print(1)", "```",
        "<!-- run: gpu -->", "```yaml", "a: 1", "```",
        "<!-- run: cpu -->", "no block here",
        "```text", "not collected", "```"])
    blocks, problems = parse(REPO / "docs" / "example.md", text)
    assert [(b.line, b.lang, b.kind) for b in blocks] == [(2, "shell", "cpu"), (5, "shell", None), (9, "python", "laptop")]
    assert problems == [
        "example.md:5: a ```bash block without a marker line before it (<!-- run: KIND -->, KIND one of "
        "cpu, long, gpu, cluster, download)",
        "example.md:8: unknown marker kind 'laptop' (known: cpu, long, gpu, cluster, download)",
        "example.md:12: a marker before a ```yaml block (only bash and python blocks run)",
        "example.md:16: a marker that no fenced block follows"]

    def problems_of(text: str, lang: str = "shell") -> list[str]:
        return check_block(Block(REPO / "README.md", 1, lang, "cpu", text))

    assert problems_of("for x in; do\n") and problems_of("print(", "python")
    assert problems_of(".venv/bin/h3pretrain trian --config launch/configs/tiny.yaml\n") == [
        "h3pretrain trian --config launch/configs/tiny.yaml: no such subcommand"]
    found = problems_of("torchrun --nproc_per_node=2 -m h3pretrain.cli train --steps 3 --set train.stepz=3 "
                        "--config launch/configs/none.yaml  # a comment --not-checked\n")
    assert found[:2] == ["launch/configs/none.yaml: no such file in the repository", "h3pretrain train: no option --steps"]
    assert len(found) == 3 and found[2].startswith("h3pretrain train --set: override 'train.stepz=3': no key 'stepz'")
    assert problems_of("h3pretrain slurm submitt --config x\nh3pretrain generate --checkpoint c --prompt p "
                       "--max-tokens 3 | head -3 > out.txt && cat out.txt\n") == [
        "h3pretrain slurm submitt: no such action", "h3pretrain generate: no option --max-tokens"]
    assert problems_of("make pretrain-2.7b DRY_RUN=1 SET='train.steps=x'; make pretrian\n.venv/bin/nothere\n") == [
        "make SET: train.steps: expected int, got 'x'", "make pretrian: no such target in the Makefile",
        ".venv/bin/nothere: no such program in .venv"]
    assert problems_of("make pretrain SET='train.steps=20 train.lr=1e-3'\nmake status RUN=$H3_RUNS/x\n") == []


# --- running the cpu blocks ----------------------------------------------------------------------

CPU_BLOCKS = [b for b in all_blocks() if b.kind == "cpu"]
# what the caller's environment may set that the documented commands read (Makefile, configs)
CLEARED = ("H3_DATA", "H3_RUNS", "H3_TOKENIZER", "H3_MLFLOW_URI", "SET", "DRY_RUN", "NODES", "GPUS_PER_NODE",
           "TIME", "PARTITION", "ACCOUNT", "RUN")


def _copy_repository(root: Path) -> None:
    """The working tree's files that git tracks or would track, with their times (so that make sees
    .venv as up to date), and .venv itself as a link."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        src = REPO / name
        if src.is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, root / name)
    (root / ".venv").symlink_to(REPO / ".venv")


def _write_corpus(out: Path, docs: list[str]) -> None:
    """Pile-format jsonl.zst files, as data_prep.corpus writes them."""
    import zstandard

    out.mkdir(parents=True)
    for i in range(3):
        lines = [json.dumps({"text": t, "meta": {"pile_set_name": "StdlibDocstrings"}}) for t in docs[i::3]]
        (out / f"corpus-{i:02d}.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(
            ("\n".join(lines) + "\n").encode()))


@pytest.fixture(scope="module")
def workspace(corpus, tmp_path_factory):
    """A copy of the repository in which the cpu blocks run, one after another. Its data/corpus is
    the suite's corpus fixture cut into paragraphs (5,000 and more documents), so that `make
    corpus` keeps it and prep's default validation fraction (0.005) finds validation documents, as
    it does in the full local corpus."""
    if not (REPO / ".venv" / "bin" / "python").exists():
        pytest.fail("no .venv: run `make setup` first")
    root = tmp_path_factory.mktemp("docs") / "h3pretrain"
    _copy_repository(root)
    if subprocess.run(["make", "-q", "setup"], cwd=root, env=_env(), capture_output=True).returncode:
        pytest.fail(".venv is older than pyproject.toml or launch/: run `make setup` first")
    docs = [p for d in corpus_docs(corpus) for p in d.split("\n\n") if p.strip()]
    assert len(docs) > 1000
    _write_corpus(root / "data" / "corpus", docs)
    return root


def _env() -> dict:
    """The caller's environment, less what the documented commands read. make runs the repository's
    .venv by its own path (VENV), as `.venv/bin/h3pretrain` does: through the copy's link the
    paths would differ, and DeepSpeed would rebuild its CPU comm op (minutes) for each of the two;
    the op is built once into .venv/torch_extensions, where make puts it."""
    env = {k: v for k, v in os.environ.items() if k not in CLEARED}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".venv" / "torch_extensions"))
    return {**env, "VENV": str(REPO / ".venv"), "MLFLOW_DISABLE_TELEMETRY": "true", "PYTHONUNBUFFERED": "1"}


def _run(block_text: str, lang: str, root: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = ["bash", "-e", "-o", "pipefail", "-c", block_text] if lang == "shell" else \
        [str(root / ".venv" / "bin" / "python"), "-c", block_text]
    return subprocess.run(cmd, cwd=root, env=_env(), capture_output=True, text=True, timeout=timeout)


def _summaries_checked(root: Path, output: str) -> int:
    """Run the generate and export-hf commands of every summary in `output` as printed, and check
    the summary's lines against the run it names; returns how many summaries there were."""
    lines = output.splitlines()
    found = 0
    for i, line in enumerate(lines):
        if not line.startswith("next: sample from it"):
            continue
        found += 1
        head, run_line = lines[i - 2], lines[i - 1]
        run = head.split(":")[0].removeprefix("run ")
        status = json.loads((root / run / "status.json").read_text())
        train = [json.loads(x) for x in (root / run / "metrics.jsonl").read_text().splitlines()]
        train = [r for r in train if r["kind"] == "train"][-1]
        assert head.startswith(f"run {run}: {status['state']}, step {status['step']} of {status['steps']} | "
                               f"train loss {train['loss']:.4f}")
        latest = (root / run / "checkpoints" / "latest").read_text().strip()
        assert run_line == f"checkpoint {run}/checkpoints/{latest} | metrics {run}/metrics.jsonl"
        generate, export, mlflow = (x.strip() for x in lines[i + 1:i + 4])
        for command in (generate, export):
            done = _run(command, "shell", root)
            assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}{done.stderr[-3000:]}"
            if command is generate:
                assert done.stdout.startswith("The module"), done.stdout[:500]
        assert (root / shlex.split(export)[-1] / "model.safetensors").is_file()
        program, ui, option, uri = shlex.split(mlflow)
        assert (ui, option, uri) == ("ui", "--backend-store-uri", f"sqlite:///{root / run / 'mlflow.db'}")
        assert (root / run / "mlflow.db").is_file()
        helped = subprocess.run([str(root / program), "ui", "--help"], cwd=root, env=_env(), capture_output=True,
                                text=True, timeout=120)
        assert helped.returncode == 0 and "--backend-store-uri" in helped.stdout
        if run == "checkpoints/tiny":  # the README shows these lines, $PWD for the repository's path
            shown = (REPO / "README.md").read_text(encoding="utf-8")
            here = {f"{REPO}/.venv/": ".venv/", f"sqlite:///{root}/": "sqlite:///$PWD/"}  # (.venv: see _env)
            for printed in (generate, export, mlflow):
                printed = re.sub("|".join(map(re.escape, here)), lambda m: here[m.group(0)], printed)
                assert f"  {printed}\n" in shown, f"README.md does not show the summary's line {printed!r}"
    return found


@pytest.mark.slow
@pytest.mark.parametrize("block", CPU_BLOCKS, ids=[b.name for b in CPU_BLOCKS])
def test_cpu_block_runs(block, workspace):
    done = _run(block.text, block.lang, workspace)
    assert done.returncode == 0, (f"{block.name} exited {done.returncode}:\n{block.text}\n"
                                  f"{done.stdout[-3000:]}\n{done.stderr[-5000:]}")
    summaries = _summaries_checked(workspace, done.stdout)
    pretrains = sum(1 for words in commands(block.text) if words[:2] == ["make", "pretrain"])
    assert summaries == pretrains, f"{block.name}: {pretrains} make pretrain, {summaries} summaries"
