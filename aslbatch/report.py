"""Report rendering shared by the QC pages, the evaluation report and the bench report.

One stylesheet and page skeleton for self-contained HTML (styles inline, images as PNG data
URIs), PNG encoding of a matplotlib figure or of an indexed-colour pixel array, and tables in
three forms: HTML (escaped with :func:`html.escape`), Markdown (pipes escaped) and plain text
for the terminal (columns padded to their widest cell).

matplotlib and PIL are imported only inside the functions that draw or encode, so importing
this module (and the CLI) stays fast.
"""

from __future__ import annotations

import base64
import html
import io
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    from matplotlib.figure import Figure

__all__ = ["CSS", "data_uri", "escape", "figure_png", "html_page", "html_table", "img", "indexed_png",
           "markdown_table", "new_figure", "text_table"]

#: the stylesheet of every page; a page adds its own rules after it (``html_page(extra_css=...)``)
CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; max-width: 1200px; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 1.6em; border-bottom: 1px solid #ccc; }
h3 { font-size: 1em; margin-bottom: 0.3em; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; }
th, td { border: 1px solid #ccc; padding: 2px 8px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
figure { margin: 0.5em 0 1.1em 0; } figcaption { font-size: 0.85em; color: #444; }
pre { background: #f6f6f6; padding: 0.5em; font-size: 0.8em; overflow-x: auto; }
.warn { color: #b00020; font-weight: bold; } .muted { color: #777; }
"""


def escape(value: Any) -> str:
    """``str(value)`` escaped for HTML text and attribute values (``& < > " '``)."""
    return html.escape(str(value), quote=True)


# --- PNG --------------------------------------------------------------------------------------


def new_figure(width_in: float, height_in: float, *, dpi: float = 100, layout: str | None = "constrained") -> Figure:
    """A bare matplotlib Figure (no pyplot, no global state) of ``width_in`` × ``height_in`` inches."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width_in, height_in), dpi=dpi, layout=layout)


def figure_png(fig: Figure) -> bytes:
    """The figure rendered by Agg as PNG bytes at its own dpi, without a Software tag (same
    figure, same bytes)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    buffer = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buffer, metadata={"Software": None})
    return buffer.getvalue()


def indexed_png(pixels: np.ndarray, palette: np.ndarray) -> bytes:
    """An indexed-colour PNG: ``pixels`` (rows × columns, integers < 256) index ``palette``
    (n × 3 uint8 RGB, n <= 256)."""
    import numpy as np
    import PIL.Image

    palette = np.asarray(palette, dtype=np.uint8)
    if palette.ndim != 2 or palette.shape[1] != 3 or not 0 < palette.shape[0] <= 256:
        raise ValueError(f"palette must be n x 3 RGB with 1 <= n <= 256, got shape {palette.shape}")
    image = PIL.Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8))
    image.putpalette(palette.tobytes())
    buffer = io.BytesIO()
    image.save(buffer, format="png")
    return buffer.getvalue()


def data_uri(png: bytes) -> str:
    """``data:image/png;base64,...`` for embedding ``png`` in a page."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


# --- HTML -------------------------------------------------------------------------------------


def img(png: bytes, alt: str, width: int | None = None, height: int | None = None) -> str:
    """An ``<img>`` holding ``png`` as a data URI; ``width`` and ``height`` (px) when both are given."""
    size = f' width="{width}" height="{height}"' if width and height else ""
    return f'<img src="{data_uri(png)}" alt="{escape(alt)}"{size}>'


def html_table(header: Sequence[Any] | None, rows: Sequence[Sequence[Any]]) -> str:
    """A ``<table>``: a header row of ``<th>`` (none if ``header`` is None), then ``<td>`` rows;
    every cell is ``str()``-ed and escaped."""
    head = "<tr>" + "".join(f"<th>{escape(h)}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table>{head}{body}</table>"


def html_page(title: str, body: str, *, head: str = "", extra_css: str = "") -> str:
    """A self-contained HTML5 page: ``title`` (escaped), :data:`CSS` then ``extra_css`` inline,
    ``head`` (trusted markup, e.g. a ``<meta>``) in the head and ``body`` (trusted markup)."""
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">{head}<title>{escape(title)}</title>'
            f"<style>{CSS}{extra_css}</style></head>\n<body>\n{body}\n</body></html>\n")


# --- text tables ------------------------------------------------------------------------------


def markdown_table(header: Sequence[Any], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table (no trailing newline); ``|`` in a cell is escaped."""

    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def text_table(header: Sequence[Any], rows: Sequence[Sequence[Any]], *, align: str | None = None) -> str:
    """A plain-text table for the terminal (no trailing newline): each column padded to its widest
    cell (header included), two spaces apart. ``align``: one character per column, ``l`` or ``r``
    (default: every column left-aligned). Trailing spaces are stripped."""
    columns = len(header)
    if any(len(row) != columns for row in rows):
        raise ValueError(f"every row needs {columns} cells")
    align = align or "l" * columns
    if len(align) != columns or set(align) - {"l", "r"}:
        raise ValueError(f"align needs one 'l' or 'r' per column ({columns}), got {align!r}")
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(line[j]) for line in cells) for j in range(columns)]
    return "\n".join("  ".join(c.rjust(w) if a == "r" else c.ljust(w) for c, w, a in zip(line, widths, align)).rstrip()
                     for line in cells)
