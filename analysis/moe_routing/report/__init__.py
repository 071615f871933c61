"""Execute the notebooks and publish them as one static, offline HTML report.

For each ``notebooks/NN_*.py`` (jupytext py:percent) :func:`build_report` converts the source to a notebook,
executes it with papermill (parameters go into the cell tagged ``parameters``), writes the executed
``.ipynb`` and an HTML page (nbconvert; plotly figures load the report's one offline copy ``plotly.min.js``),
gives every page a navigation bar (index, previous / next) and a table of contents, and finally writes
``index.html``: what produced the report (model, corpus and any fallback, dtype, device: :func:`run_facts`),
whether a notebook failed, and every page with its sections, run time and status (``run.json``,
``report.json``).

    python -m moe_routing.report                       # all notebooks -> report/
    python -m moe_routing.report --only 01 --param trace_dir=runs/demo --param max_docs=50

Modules: :mod:`.execute` (discovery, kernel, papermill, ``build_report``, the command), :mod:`.render` (HTML
pages, shared plotly.js, navigation, index, provenance), :mod:`.browser` (headless Chromium: DOM, screenshots,
figure census). Every name stays importable from ``moe_routing.report``.
"""

from __future__ import annotations

from .browser import (
    CHROMIUM_FLAGS,
    dump_dom,
    rendered_figures,
    screenshot,
    screenshot_report,
)
from .browser import (
    _chromium as _chromium,
)
from .browser import (
    _FigureCensus as _FigureCensus,
)
from .execute import (
    NOTEBOOK_PATTERN,
    PROJECT_NOTEBOOKS,
    add_arguments,
    build_report,
    ensure_kernel,
    failed_notebooks,
    find_notebooks,
    main,
    notebook_title,
    parse_params,
    parse_value,
    project_notebooks,
    resolve_notebooks_dir,
    run,
    run_notebook,
    summarize,
)
from .execute import (
    _env as _env,
)
from .render import (
    PLOTLY_MIME,
    PLOTLYJS_FILE,
    NotebookResult,
    add_navigation,
    page_headings,
    render_html,
    run_facts,
    write_index,
    write_plotlyjs,
)
from .render import (
    _plotly_outputs_to_html as _plotly_outputs_to_html,
)
from .render import (
    _plotlyjs_tag as _plotlyjs_tag,
)

__all__ = [
    "CHROMIUM_FLAGS",
    "NOTEBOOK_PATTERN",
    "PLOTLYJS_FILE",
    "PLOTLY_MIME",
    "PROJECT_NOTEBOOKS",
    "NotebookResult",
    "add_arguments",
    "add_navigation",
    "build_report",
    "dump_dom",
    "ensure_kernel",
    "failed_notebooks",
    "find_notebooks",
    "main",
    "notebook_title",
    "page_headings",
    "parse_params",
    "parse_value",
    "project_notebooks",
    "render_html",
    "rendered_figures",
    "resolve_notebooks_dir",
    "run",
    "run_facts",
    "run_notebook",
    "screenshot",
    "screenshot_report",
    "summarize",
    "write_index",
    "write_plotlyjs",
]
