"""Make the built book work offline and load cleanly.

1. Serve MathJax from the built book instead of a CDN, so math renders offline.

MathJax 3.2.2 comes from the pinned ``django-static-mathjax`` wheel (the MathJax distribution as
package data, no dependencies). ``_config.yml`` points ``mathjax_path`` at ``_static/mathjax/…``;
this extension copies the single self-contained ``tex-svg-full.js`` component there after the build.

2. Drop repeated ``<script>`` entries: the Jupyter Book 1.0 stack registers sphinx-thebe's inline
   configuration twice, and the second copy throws "Identifier 'THEBE_JS_URL' has already been
   declared" in every reader's console.
"""
from __future__ import annotations

import shutil
from importlib.resources import files
from pathlib import Path

COMPONENT = "tex-svg-full.js"


def _source() -> Path:
    path = Path(str(files("mathjax"))) / "static" / "mathjax" / "es5" / COMPONENT
    if not path.is_file():
        raise FileNotFoundError(
            f"MathJax component {path} is missing: install the pinned requirements "
            "(pip install -r requirements-dev.txt) so the book can serve MathJax itself")
    return path


def _copy(app, exception) -> None:
    if exception is not None or app.builder.format != "html":
        return
    target = Path(app.outdir) / "_static" / "mathjax"
    target.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(_source(), target / COMPONENT)


def _dedupe_scripts(app, pagename, templatename, context, doctree) -> None:
    seen, unique = set(), []
    for script in context.get("script_files", []):
        key = (str(getattr(script, "filename", script) or ""), repr(sorted(getattr(script, "attributes", {}).items())))
        if key not in seen:
            seen.add(key)
            unique.append(script)
    context["script_files"][:] = unique  # in place: the theme renders from the builder's own list


def setup(app):
    _source()  # fail early, with the fix in the message, rather than ship a book without math
    app.connect("build-finished", _copy)
    app.connect("html-page-context", _dedupe_scripts, priority=999)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
