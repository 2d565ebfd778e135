"""The documentation site builds with ``mkdocs build --strict``: a link to a page or a file the site
does not have, or to an anchor a page does not have, is a warning (mkdocs.yml's ``validation``),
and strict mode fails the build on it. The README's links to the docs are checked here too, since
the README is not part of the site."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Inline links and images: [text](target) and ![alt](target); the target without its anchor.
LINK = re.compile(r"!?\[[^\]]*\]\((?P<target>[^)\s#]+)(?:#[^)\s]*)?\)")


def build(site: Path, config: Path = ROOT / "mkdocs.yml") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(config), "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )


def test_the_docs_build_strict_with_no_broken_link_or_anchor(tmp_path: Path) -> None:
    done = build(tmp_path / "site")
    assert done.returncode == 0, done.stdout + done.stderr
    for page in ["index.html", "getting-started/index.html", "api/oip/index.html", "performance/index.html"]:
        assert (tmp_path / "site" / page).is_file(), page
    # benchmarks/results/ and deploy/README.md are carried into the site where they are in the repository
    assert (tmp_path / "site" / "benchmarks" / "results" / "serving" / "index.html").is_file()
    assert (tmp_path / "site" / "deploy" / "index.html").is_file()
    # no web fonts or other requests to a CDN: the built site works offline
    assert "fonts.googleapis.com" not in (tmp_path / "site" / "index.html").read_text()


def test_a_broken_link_or_anchor_fails_the_build(tmp_path: Path) -> None:
    """The check above can fail: a copy of the site with one bad link added does not build."""
    for i, bad in enumerate(["no-such-page.md", "concepts.md#no-such-anchor", "../benchmarks/results/no-such.md"]):
        copy = tmp_path / str(i)
        for part in ["docs", "benchmarks/results", "deploy", "scripts"]:
            shutil.copytree(ROOT / part, copy / part)
        shutil.copy(ROOT / "mkdocs.yml", copy / "mkdocs.yml")
        index = copy / "docs" / "index.md"
        index.write_text(index.read_text() + f"\n[gone]({bad})\n")
        done = build(copy / "site", copy / "mkdocs.yml")
        assert done.returncode != 0 and bad in done.stdout + done.stderr, (bad, done.stdout + done.stderr)


def test_the_readmes_links_lead_to_files_of_the_repository() -> None:
    """Relative links, so they work on GitHub. The console's screenshot comes with the console."""
    console = (ROOT / "server" / "routes" / "console.py").exists()
    targets = [m["target"] for m in LINK.finditer((ROOT / "README.md").read_text()) if "://" not in m["target"]]
    assert any(t.startswith("docs/") for t in targets)
    missing = [t for t in targets if not (ROOT / t).exists() and (console or t != "docs/img/console.png")]
    assert not missing, missing
