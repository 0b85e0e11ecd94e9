"""The README stays honest: its set-up and test commands are the ones CI runs, every link in the
user documents resolves, and the README stays short enough to read."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
README_LIMIT = 20_000  # bytes; a newcomer should reach the answers before the layout table

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def setup_section(text: str) -> str:
    section = re.search(r"^## Set-up and tests\n(.*?)(?=^## )", text, re.S | re.M)
    assert section, "README.md has no '## Set-up and tests' section"
    return section.group(1)


def setup_commands(text: str) -> list[str]:
    """The commands of the first fenced block under the README's set-up heading, one per `&&` part,
    trailing comments dropped."""
    block = re.search(r"```[a-z]*\n(.*?)```", setup_section(text), re.S)
    assert block, "the set-up section has no fenced command block"
    commands = []
    for line in block.group(1).splitlines():
        line = line.split(" # ")[0].strip()
        commands += [part.strip() for part in line.split(" && ") if part.strip()]
    return commands


def ci_commands(text: str) -> set[str]:
    return {line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")}


def documents() -> list[Path]:
    docs = [README, ROOT / "scripts" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    return docs + sorted((ROOT / "results").rglob("README.md"))


def broken_links(doc: Path) -> list[str]:
    broken = []
    for target in LINK.findall(doc.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue  # web addresses and anchors in the same page
        if not (doc.parent / target.split("#")[0]).exists():
            broken.append(target)
    return broken


def test_setup_and_test_commands_are_what_ci_runs():
    commands = setup_commands(README.read_text(encoding="utf-8"))
    assert len(commands) >= 2, commands
    assert "python -m pytest -q" in commands, "the README's test command is not `python -m pytest -q`"
    ci = ci_commands((ROOT / ".ci" / "run").read_text(encoding="utf-8"))
    missing = [c for c in commands if c not in ci]
    assert not missing, f"README set-up commands not in .ci/run as written: {missing}"


def test_other_test_commands_are_what_ci_runs():
    # The set-up section's prose names further test commands (the slow tests); CI must run them as written.
    named = re.findall(r"`(python -m pytest[^`]*)`", setup_section(README.read_text(encoding="utf-8")))
    assert named, "the set-up section names no test command besides its block (the slow tests')"
    ci = ci_commands((ROOT / ".ci" / "run").read_text(encoding="utf-8"))
    missing = [c for c in named if c not in ci]
    assert not missing, f"README test commands not in .ci/run as written: {missing}"


def test_readme_is_short():
    size = len(README.read_bytes())
    assert size < README_LIMIT, f"README.md is {size} bytes; keep it under {README_LIMIT}"


@pytest.mark.parametrize("doc", documents(), ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve(doc):
    broken = broken_links(doc)
    assert not broken, f"{doc.relative_to(ROOT)} links to missing files: {broken}"


# Work-round history belongs in docs/history.md; the other documents say what is true now.
HISTORY_WORDING = re.compile(r"\b(issue|session|round) \d+|issue's|re-timed|not re-measured|this call|last call",
                             re.IGNORECASE)


@pytest.mark.parametrize("doc", [d for d in documents() if d.name != "history.md"],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_no_history_wording(doc):
    hits = [m.group(0) for m in HISTORY_WORDING.finditer(doc.read_text(encoding="utf-8"))]
    assert not hits, f"{doc.relative_to(ROOT)}: history wording {hits} (it goes in docs/history.md)"


def test_readme_links_results_and_docs():
    # The README's figures must point at their committed files; an edit that drops every link to
    # results/ or docs/ would leave the link check with nothing to check.
    targets = LINK.findall(README.read_text(encoding="utf-8"))
    assert any(t.startswith("results/") for t in targets)
    assert any(t.startswith("docs/") for t in targets)
