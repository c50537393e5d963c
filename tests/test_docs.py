"""The documentation: the README stays short with both set-up commands first, CI runs its test command, the site
builds with every link resolved, and its home page is the README."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from conftest import ROOT


def readme_commands() -> list[str]:
    block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    return [line for line in block.splitlines() if line and not line.startswith("#")]


def test_readme_is_short_and_starts_with_the_two_setup_commands():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 150
    run, test = readme_commands()
    assert "pip install -q -e ." in run and "infer.py --prompt" in run
    assert "pip install -q -e '.[test]'" in test and "pytest" in test
    assert text.index("```bash") < text.index("\n## ")  # before any section


def test_ci_runs_the_readmes_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert readme_commands()[1] in ci


def test_the_site_builds_strictly_and_its_home_is_the_readme(tmp_path):
    readme = (ROOT / "README.md").read_text().replace("](docs/", "](")
    assert (ROOT / "docs" / "index.md").read_text() == readme, \
        "docs/index.md is stale: it is README.md with its links to docs/ made relative"
    mkdocs = Path(sys.executable).with_name("mkdocs")
    r = subprocess.run([str(mkdocs), "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (tmp_path / "site" / "options" / "index.html").is_file()
