"""MkDocs hooks (mkdocs.yml ``hooks:``): the site carries a few files that live outside ``docs/``.

The benchmark results (``benchmarks/results/``: every table the benchmarks write) and the deployment
notes beside their manifests (``deploy/README.md``) stay where the code that writes or uses them
is, and the site renders them under the same paths. A docs page links to them as it would on
GitHub, relative to its own place in the repository (``../benchmarks/results/serving.md`` from
``docs/performance.md``), and this hook rewrites such a link to the page the site holds, so MkDocs
checks it as any other: a link to a file that is neither in ``docs/`` nor carried fails
``mkdocs build --strict``.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

# Folders of the repository the site carries, and which of their files.
CARRIED = {"benchmarks/results": {".md", ".png"}, "deploy": {".md"}}
# An inline Markdown link or image target: ](target) or ](target#anchor); outside code spans is
# enough here, since a code block's text never holds a `](../` link.
LINK = re.compile(r"(?<=\]\()(?P<target>\.\./[^)\s#]+)(?P<anchor>#[^)\s]*)?(?=\))")


def _root(config: Any) -> Path:
    return Path(config["config_file_path"]).resolve().parent


def on_files(files: Files, config: Any) -> Files:
    root = _root(config)
    for folder, suffixes in CARRIED.items():
        for path in sorted((root / folder).rglob("*")):
            if path.is_file() and path.suffix in suffixes:
                uri = path.relative_to(root).as_posix()
                files.append(File.generated(config, uri, abs_src_path=str(path)))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    """Rewrite links written as on GitHub (relative to the file's place in the repository) that leave
    ``docs/`` for a carried file, or lead from a carried file into ``docs/``, into links within the
    site."""
    docs = Path(config["docs_dir"]).resolve()
    root = _root(config)
    source = Path(page.file.abs_src_path).resolve()
    here = posixpath.dirname(page.file.src_uri)

    def rewrite(match: re.Match[str]) -> str:
        target = (source.parent / match["target"]).resolve()
        if target.is_relative_to(docs):  # from a carried file back into docs/
            uri = target.relative_to(docs).as_posix()
        elif target.is_relative_to(root):
            uri = target.relative_to(root).as_posix()
        else:
            return match[0]
        if files.get_file_from_path(uri) is None:
            return match[0]  # left as written: MkDocs reports it as a link to a file it does not have
        return posixpath.relpath(uri, here or ".") + (match["anchor"] or "")

    return LINK.sub(rewrite, markdown)
