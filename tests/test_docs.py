"""The README's and docs' examples run, on tiny local models.

Python blocks are taken out with mktestdocs and run one after another in one namespace per page; in shell
blocks the ``neo-jax`` lines (and ``VAR=value`` lines) run through ``neo_jax.cli.main``, in process; other
shell lines (pip, curl, gcloud) are not run. A hub id of a released GPT-Neo runs against a local stand-in
(two layers, GPT-2's vocabulary, random weights). A block that cannot run here (a TPU run, a server, a dataset
download) is preceded by ``<!-- not run: REASON -->``, which mkdocs does not show; it is counted, with its
reason, and must say why."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
from pathlib import Path

import mktestdocs
import pytest

from neo_jax.cli import main
from tests.conftest import save_gpt2_vocab_model

ROOT = Path(__file__).parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
ENGLISH = ROOT / "tests" / "fixtures" / "english"
HUB_IDS = re.compile(r"EleutherAI/gpt-neo-(125M|1\.3B|2\.7B)")
NOT_RUN = re.compile(r"<!-- not run: (.+?) -->\n```")
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.DOTALL | re.MULTILINE)


@pytest.fixture(scope="session")
def workspace(tmp_path_factory) -> Path:
    """What the examples refer to: the stand-in model, text files, an adapter, a run."""
    root = tmp_path_factory.mktemp("docs-workspace")
    standin = save_gpt2_vocab_model(root / "standin", max_position_embeddings=2048)
    for directory in ("corpus", "heldout"):
        (root / directory).mkdir()
        for text in ENGLISH.glob("*.txt"):
            shutil.copy(text, root / directory / text.name)
    (root / "corpus.txt").write_text((ENGLISH / "declaration.txt").read_text())
    (root / "prompt.txt").write_text("Four score and seven years ago")
    texts = (ENGLISH / "declaration.txt").read_text().split("\n\n")
    (root / "notes.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts if t.strip()))
    import neo_jax
    import neo_jax.peft
    from neo_jax import lora

    model = neo_jax.from_pretrained(standin, progress=False)
    lora.add(model, lora.LoRAConfig(r=4, alpha=8))
    neo_jax.peft.save(model, root / "my-peft-adapter", base_model=str(standin))
    return root


def blocks(page: Path, standin: Path) -> tuple[list[tuple[str, str]], list[str]]:
    """(language, code) of the blocks that run, hub ids replaced by the stand-in; and the reasons of those
    that do not."""
    text = page.read_text()
    skipped = NOT_RUN.findall(text)
    text = re.sub(r"<!-- not run: .+? -->\n```\w*\n.*?^```\n?", "", text, flags=re.DOTALL | re.MULTILINE)
    text = HUB_IDS.sub(str(standin), text)
    found = [(lang, code) for lang in ("python", "bash") for code in mktestdocs.grab_code_blocks(text, lang=lang)]
    order = {code: i for i, (_, code) in enumerate(BLOCK.findall(text))}
    return sorted(found, key=lambda block: order.get(block[1], 0)), skipped


def run_shell(code: str) -> int:
    """The block's ``neo-jax`` lines through the CLI, in order; returns how many ran."""
    variables, ran = {}, 0
    for line in code.replace("\\\n", " ").splitlines():
        line = line.split(" # ")[0].strip()
        if re.fullmatch(r"[A-Z_]+=\S+", line):
            name, value = line.split("=", 1)
            variables[name] = value
        elif line.startswith("neo-jax "):
            line = re.sub(r"\$\{?([A-Z_]+)\}?", lambda m: variables[m.group(1)], line)
            status = main(shlex.split(line)[1:])
            assert status == 0, f"`{line}` exited {status}"
            ran += 1
    return ran


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_the_examples_run(page, workspace, tmp_path, monkeypatch):
    shutil.copytree(workspace, tmp_path, dirs_exist_ok=True)
    standin = tmp_path / "standin"
    text = page.read_text()
    if not re.search(r"convert \S+ \./gpt-neo-125M(\s|$)", text):  # the pages that use ./gpt-neo-125M as made
        shutil.copytree(standin, tmp_path / "gpt-neo-125M")
    shutil.copytree(standin, tmp_path / "runs" / "mine")  # a model directory, as a train output is one
    monkeypatch.chdir(tmp_path)
    runnable, skipped = blocks(page, standin)
    assert all(reason.strip() for reason in skipped)
    namespace = {"__name__": "__main__"}
    for lang, code in runnable:
        if lang == "python":
            exec(compile(code, f"{page.name} example", "exec"), namespace)  # noqa: S102
        else:
            run_shell(code)
    print(f"{page.name}: {len(runnable)} blocks run, {len(skipped)} not run: {skipped}")
    if os.environ.get("NEO_JAX_DOCS_REPORT"):
        with open(os.environ["NEO_JAX_DOCS_REPORT"], "a") as f:
            f.write(json.dumps({"page": page.name, "run": len(runnable), "not_run": skipped}) + "\n")
