"""``aslbatch.report``: PNGs that decode to what was drawn, tables that escape and align, pages that parse."""

import base64
import io
import subprocess
import sys
from html.parser import HTMLParser

import matplotlib.image
import numpy as np
import PIL.Image
import pytest

from aslbatch.report import (CSS, data_uri, escape, figure_png, html_page, html_table, img, indexed_png,
                             markdown_table, new_figure, text_table)


def _decode(uri):
    prefix = "data:image/png;base64,"
    assert uri.startswith(prefix)
    return base64.b64decode(uri[len(prefix):], validate=True)


def test_indexed_png_data_uri_decodes_to_the_same_pixels():
    rng = np.random.default_rng(0)
    palette = rng.integers(0, 256, size=(256, 3), dtype=np.uint8)
    pixels = rng.integers(0, 256, size=(37, 53), dtype=np.uint8)
    png = _decode(data_uri(indexed_png(pixels, palette)))
    decoded = PIL.Image.open(io.BytesIO(png))
    assert decoded.mode == "P"
    np.testing.assert_array_equal(np.asarray(decoded), pixels)
    np.testing.assert_array_equal(np.asarray(decoded.convert("RGB")), palette[pixels])  # the colours, via PIL
    rgb = matplotlib.image.imread(io.BytesIO(png), format="png")[..., :3]  # a second decoder
    np.testing.assert_array_equal(np.round(rgb * 255).astype(np.uint8), palette[pixels])


def test_indexed_png_rejects_a_palette_that_is_not_rgb():
    with pytest.raises(ValueError, match="palette"):
        indexed_png(np.zeros((2, 2), np.uint8), np.zeros((4, 4), np.uint8))


def test_figure_png_holds_the_pixels_agg_drew():
    # a figure filled with an image of known colours, no axes decoration: the PNG's pixels are those colours
    fig = new_figure(0.5, 0.25, dpi=100, layout=None)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_axis_off()
    colours = np.array([[[255, 0, 0], [0, 0, 255]]], dtype=np.uint8)  # left red, right blue
    ax.imshow(colours, aspect="auto", interpolation="nearest")
    png = figure_png(fig)
    pixels = np.asarray(PIL.Image.open(io.BytesIO(png)).convert("RGB"))
    assert pixels.shape == (25, 50, 3)
    np.testing.assert_array_equal(pixels[5:20, 5:20], np.broadcast_to([255, 0, 0], (15, 15, 3)))
    np.testing.assert_array_equal(pixels[5:20, 30:45], np.broadcast_to([0, 0, 255], (15, 15, 3)))
    assert figure_png(fig) == png, "same figure, same bytes (no time stamp or version in the file)"
    assert b"Software" not in png


def test_html_table_escapes_every_cell():
    table = html_table(["a<b", "x & y"], [["<script>", 'say "hi"'], [1.5, None]])
    assert "<script>" not in table and "a<b" not in table
    assert "&lt;script&gt;" in table and "a&lt;b" in table and "x &amp; y" in table and "&quot;hi&quot;" in table
    cells = _Cells()
    cells.feed(table)
    assert cells.rows == [["a<b", "x & y"], ["<script>", 'say "hi"'], ["1.5", "None"]]
    assert "<th>" not in html_table(None, [["1"]])


def test_escape_and_img_attribute():
    assert escape("<&>\"'") == "&lt;&amp;&gt;&quot;&#x27;"
    tag = img(b"\x89PNG", 'a "b" <c>', 10, 20)
    assert 'alt="a &quot;b&quot; &lt;c&gt;"' in tag and 'width="10" height="20"' in tag
    assert _decode(tag.split('src="')[1].split('"')[0]) == b"\x89PNG"


def test_html_page_is_self_contained_and_well_formed():
    page = html_page("A < B", "<p>body</p>", head='<meta name="x" content="y">', extra_css=".mine { color: red; }")
    assert page.startswith("<!DOCTYPE html>") and "<title>A &lt; B</title>" in page
    assert CSS in page and ".mine { color: red; }" in page and '<meta name="x" content="y">' in page
    assert "http" not in page and "<link" not in page
    cells = _Cells()
    cells.feed(page)
    assert cells.open == []


def test_markdown_table_escapes_pipes():
    text = markdown_table(["a", "b|c"], [["1", "x|y"]])
    assert text.splitlines() == ["| a | b\\|c |", "|---|---|", "| 1 | x\\|y |"]


def test_text_table_aligns_columns_whatever_the_width_of_a_cell():
    rows = [["sub-01", "lm", "12.5", "s"], ["sub-01", "supervised-mae", "0.031", "mL/100 g/min"],
            ["sub-02", "lut", "7", ""]]
    lines = text_table(["subject", "method", "error", "unit"], rows, align="llrl").splitlines()
    assert len(lines) == 4
    starts = [lines[0].index(word) for word in ("subject", "method", "error", "unit")]
    number_ends = {len(line[:starts[3]].rstrip()) for line in lines}
    assert len(number_ends) == 1, "right-aligned numbers end in the same column"
    for line, row in zip(lines[1:], rows):
        assert line[starts[1]:].startswith(row[1]), "every method starts under its header"
        assert line[starts[0]:].startswith(row[0])
        if row[3]:
            assert line[starts[3]:] == row[3]
    assert all(line == line.rstrip() for line in lines)
    with pytest.raises(ValueError, match="align"):
        text_table(["a", "b"], [["1", "2"]], align="lx")
    with pytest.raises(ValueError, match="cells"):
        text_table(["a", "b"], [["1"]])


def test_importing_the_cli_and_report_does_not_import_matplotlib():
    code = ("import sys, aslbatch.cli, aslbatch.report; "
            "print(sorted(m for m in ('matplotlib', 'PIL') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


class _Cells(HTMLParser):
    """Table cells by row; fails on a closing tag that closes nothing open."""

    VOID = {"meta", "img", "br"}

    def __init__(self):
        super().__init__()
        self.rows, self.open = [], []

    def handle_starttag(self, tag, attrs):
        if tag == "tr":
            self.rows.append([])
        if tag not in self.VOID:
            self.open.append(tag)

    def handle_endtag(self, tag):
        assert self.open and self.open[-1] == tag
        self.open.pop()

    def handle_data(self, data):
        if self.open and self.open[-1] in ("td", "th"):
            self.rows[-1].append(data)
