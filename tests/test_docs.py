"""Documentation that quotes program output stays in sync with the program."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_worked_example_block_matches_the_kernel():
    output = subprocess.run(
        [sys.executable, str(ROOT / "docs/worked_example.py")],
        capture_output=True, text=True, check=True,
    ).stdout
    block = re.search(r"```text\n(.*?)```", (ROOT / "docs/fapm.md").read_text(), re.S).group(1)
    assert block == output


def test_readme_starts_with_the_two_commands():
    lines = [l for l in (ROOT / "README.md").read_text().splitlines() if l.strip()]
    code = "\n".join(lines[:12])
    assert "make demo" in code and "make test" in code
    ci = (ROOT / ".ci/run").read_text()
    assert "make test" in ci


def test_readme_study_table_is_the_generated_one():
    """The README's "Does it work?" table is copied from docs/study/results.md, not typed."""
    results = (ROOT / "docs/study/results.md").read_text()
    headline = results.split("## Headline", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in headline.splitlines() if line.startswith("|")]
    readme = (ROOT / "README.md").read_text()
    assert len(rows) > 3
    for row in rows:
        assert row in readme, row


def test_committed_docs_carry_no_machine_paths():
    """Generated files must not leak the absolute paths of the machine that made them."""
    offenders = []
    for path in [ROOT / "README.md", *(ROOT / "docs").rglob("*"), *(ROOT / "recipes").rglob("*")]:
        if path.is_file() and path.suffix in (".md", ".json", ".yml", ".yaml"):
            text = path.read_text()
            if re.search(r"(^|[\s\"'(])/(root|home|work|tmp)/", text, re.M):
                offenders.append(str(path.relative_to(ROOT)))
    assert not offenders, offenders


def test_readme_sweep_example_rows_are_the_generated_ones():
    """The README's sweep example rows are copied from docs/sweep-example/results.md."""
    generated = (ROOT / "docs/sweep-example/results.md").read_text().splitlines()
    readme = (ROOT / "README.md").read_text()
    section = readme.split("**A real example**", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    assert len(rows) > 5
    for row in rows:
        assert row in generated, row
