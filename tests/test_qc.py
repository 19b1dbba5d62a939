"""QC pages from real outputs: every map shown, numbers checked against nibabel, links that resolve."""

import base64
import io
import json
import math
import re
from fnmatch import fnmatch
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import matplotlib
import matplotlib.image
import nibabel as nib
import numpy as np
import pytest
from matplotlib.colors import Normalize, to_hex, to_rgba

from aslbatch.batch import run_batch
from aslbatch.derivatives import parameter_table, write_session_outputs
from aslbatch.estimators.base import Estimate, Status
from aslbatch.models import get_model
from aslbatch.phantom import write_bids_dataset
from aslbatch.pipeline import Settings
from aslbatch.preprocess import PreparedData
from aslbatch.protocol import Constants, default_protocol
from aslbatch.derivatives import OTHER_BIDSIGNORE, QC_INDEX_NAME
from aslbatch.qc import (BACKGROUND, MAX_SLICES, MONTAGE_COLUMNS, NO_VALUE, SCALES, STATUS_COLOURS, STATUS_NAMES,
                         IndexEntry, _data_scale, _load, _tile, session_report_path, write_run_index, write_session_report)

SHAPE = (12, 14, 4)
METHODS = ("lm", "lut")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
VOID = {"meta", "img", "br", "hr", "link", "input"}


class Page(HTMLParser):
    """What a test needs from a page: images, links, tables (cell text), and a nesting check."""

    def __init__(self, text: str):
        super().__init__()
        self.images: list[dict] = []
        self.links: list[str] = []
        self.tables: list[list[list[str]]] = []
        self.text: list[str] = []
        self._open: list[str] = []
        self._cell: list[str] | None = None
        self.feed(text)
        self.close()
        assert not self._open, f"unclosed elements {self._open}"

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag not in VOID:
            self._open.append(tag)
        if tag == "img":
            self.images.append(attrs)
        elif tag == "a" and "href" in attrs:
            self.links.append(attrs["href"])
        elif tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        assert self._open and self._open[-1] == tag, f"</{tag}> closes {self._open[-1:]}"
        self._open.pop()
        if tag in ("td", "th"):
            self.tables[-1][-1].append("".join(self._cell))
            self._cell = None

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)

    def table(self, *headers: str) -> list[dict[str, str]]:
        """The rows of the one table whose header starts with ``headers``, keyed by header."""
        [table] = [t for t in self.tables if t and t[0][: len(headers)] == list(headers)]
        return [dict(zip(table[0], row)) for row in table[1:]]


def _png(src: str) -> np.ndarray:
    prefix = "data:image/png;base64,"
    assert src.startswith(prefix)
    data = base64.b64decode(src[len(prefix):], validate=True)
    assert data.startswith(PNG_SIGNATURE)
    return matplotlib.image.imread(io.BytesIO(data), format="png")


def _colours(image: np.ndarray) -> int:
    return len(np.unique(image[..., :3].reshape(-1, 3), axis=0))


def _load_map(path: Path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj, dtype=np.float64)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """sub-01 one-compartment, sub-02 a two-compartment pair; lm and lut; a QC page for each."""
    root = tmp_path_factory.mktemp("qc")
    raw = write_bids_dataset(root / "raw", subjects=2, model=["1c", "2c"], snr=8, seed=4, shape=SHAPE)
    out = root / "out"
    report = run_batch(raw, out, Settings(methods=METHODS))
    assert report.counts()["done"] == 2, report.outcomes
    provenances = {o.session: tuple(p for p in o.outputs if p.endswith("_provenance.json")) for o in report.outcomes}
    pages = {session: write_session_report(paths[0]) for session, paths in provenances.items()}
    return out, provenances, pages


@pytest.mark.parametrize("session, model", [("sub-01", "1c"), ("sub-02", "2c")])
def test_session_page_shows_every_map_of_every_method_as_real_images(run, session, model):
    out, provenances, pages = run
    page_path = pages[session]
    assert page_path == out / session / "perf" / f"{session}_qc.html"
    page = Page(page_path.read_text(encoding="utf-8"))
    params = get_model(model, default_protocol(model)).param_names
    alts = {image["alt"]: image["src"] for image in page.images}
    expected = {f"{m} {p}" for m in METHODS for p in params} | {f"lm {p}se" for p in params} \
        | {f"{q} histogram" for p in params for q in (p, p + "se")} | {f"{m} status" for m in METHODS}
    assert set(alts) == expected
    finite = {r["map"] for r in page.table("method", "map") if not r["finite / mask"].startswith("0 ")}
    for alt, src in alts.items():
        image = _png(src)
        assert image.shape[0] > 50 and image.shape[1] > 100, alt
        if alt.endswith("histogram"):  # step lines of each method on a grid; a grid alone says so
            if alt.split()[0] in finite:
                assert _colours(image) > 4, f"{alt} is blank"
            else:
                assert _colours(image) > 1 and "no finite value in the brain mask" in " ".join(page.text)
        else:  # pixels only: the brain, whatever its colours, on the white background
            assert _colours(image) >= 2 and (image[..., :3] < 1).any(), f"{alt} is blank"
    # the maps span many colours of their scale; the corner of the first slice (outside the
    # phantom's brain) is background white, not the colour of the scale's low end
    assert _colours(_png(alts["lm cbf"])) > 50
    for m in METHODS:
        for p in params:
            image = _png(alts[f"{m} {p}"])
            assert (image[image.shape[0] // 2, 3, :3] == 1).all()
    text = " ".join(page.text)
    for p in params:
        assert parameter_table()[p].units in text and parameter_table()[p].names[model] in text


@pytest.mark.parametrize("session", ["sub-01", "sub-02"])
def test_every_voxel_of_a_map_montage_shows_in_its_colour_on_the_fixed_scale(run, session):
    """Montage pixels against the colour map applied here to the files: radiological tiles
    MONTAGE_COLUMNS wide, whole pixels per voxel, white outside the mask, grey for NaN."""
    out, provenances, pages = run
    perf = pages[session].parent
    page = Page(pages[session].read_text(encoding="utf-8"))
    mask = _load(perf / f"{session}_desc-brain_mask.nii.gz")[0] > 0
    slices = [k for k in range(mask.shape[2]) if mask[:, :, k].any()]
    assert len(slices) <= MAX_SLICES  # every slice holding brain is shown, in order
    nx, ny = mask.shape[:2]
    h = math.ceil(len(slices) / MONTAGE_COLUMNS) * (ny + 1) - 1
    w = min(len(slices), MONTAGE_COLUMNS) * (nx + 1) - 1
    maps = [i for i in page.images if not i["alt"].endswith(("histogram", "status"))]
    assert len(maps) > 5
    for image in maps:
        method, quantity = image["alt"].split()
        scale = SCALES[quantity]
        values = _load(perf / f"{session}_desc-{method}_{quantity}.nii.gz")[0]
        finite = np.isfinite(values)
        colours = matplotlib.colormaps[scale.cmap](Normalize(scale.lo, scale.hi)(np.where(finite, values, 0)))
        colours[mask & ~finite] = to_rgba(NO_VALUE)
        colours[~mask] = to_rgba(BACKGROUND)
        pixels = _png(image["src"])[..., :3]
        assert pixels.shape[1] % w == 0, image["alt"]
        centres = ((np.arange(h) + 0.5) * pixels.shape[0] / h).astype(int), \
            ((np.arange(w) + 0.5) * pixels.shape[1] / w).astype(int)
        shown = pixels[np.ix_(*centres)]
        for i, k in enumerate(slices):
            r, c = divmod(i, MONTAGE_COLUMNS)
            tile = shown[r * (ny + 1): r * (ny + 1) + ny, c * (nx + 1): c * (nx + 1) + nx]
            np.testing.assert_allclose(tile, _tile(colours, k)[..., :3], atol=0.02, err_msg=image["alt"])


def test_every_montage_has_its_colour_bar_or_legend_and_slice_positions(run):
    out, provenances, pages = run
    text = pages["sub-02"].read_text(encoding="utf-8")
    figures = re.findall(r"<figure>(.*?)</figure>", text, re.S)
    montages = [f for f in figures if 'class="z"' in f]
    assert len(montages) == len([f for f in figures if "histogram" not in f]) > 5
    for figure in montages:
        assert [m.group(1) for m in re.finditer(r'class="under"[^>]*>(\w)<', figure)] == ["R", "L"]
        alt = re.search(r'alt="([^"]+)"', figure).group(1)
        method, quantity = alt.split()
        if quantity == "status":
            assert all(f">{name}</div>" in figure for name in STATUS_NAMES.values())
            continue
        scale, units = SCALES[quantity], parameter_table()[quantity.removesuffix("se")].units
        assert f"<div>{quantity} ({units})</div>" in figure
        ticks = [float(t) for t in re.findall(r'<span style="bottom:[\d.]+%">([^<]+)</span>', figure)]
        assert ticks[0] == scale.lo and ticks[-1] == scale.hi and ticks == sorted(ticks)
        cmap = matplotlib.colormaps[scale.cmap]
        gradient = re.search(r"linear-gradient\(to top, (#[0-9a-f]{6}) [^)]*(#[0-9a-f]{6}) [\d.]+%\)", figure)
        assert gradient.groups() == (to_hex(cmap(0.0)), to_hex(cmap(1.0)))


@pytest.mark.parametrize("session, model", [("sub-01", "1c"), ("sub-02", "2c")])
def test_median_iqr_and_status_shares_match_the_files(run, session, model):
    out, provenances, pages = run
    perf = pages[session].parent
    page = Page(pages[session].read_text(encoding="utf-8"))
    mask = _load_map(perf / f"{session}_desc-brain_mask.nii.gz") > 0
    rows = page.table("method", "voxels")
    assert [r["method"] for r in rows] == list(METHODS)
    for row in rows:
        shares = [float(v.split("%")[0]) for k, v in row.items() if k[0].isdigit()]
        counts = [int(v.split("(")[1].rstrip(")")) for k, v in row.items() if k[0].isdigit()]
        assert sum(shares) == pytest.approx(100, abs=0.25)
        status = _load_map(perf / f"{session}_desc-{row['method']}_status.nii.gz")
        assert sum(counts) == int(row["voxels"]) == mask.sum()
        assert counts == [int(np.count_nonzero(status[mask] == code)) for code in sorted(int(c) for c in Status)]
    stats = page.table("method", "map")
    params = get_model(model, default_protocol(model)).param_names
    assert sorted((r["method"], r["map"]) for r in stats) == sorted(
        [(m, p) for m in METHODS for p in params] + [("lm", p + "se") for p in params])
    for row in stats:
        values = _load_map(perf / f"{session}_desc-{row['method']}_{row['map']}.nii.gz")[mask]
        values = values[np.isfinite(values)]
        assert row["finite / mask"] == f"{values.size} / {mask.sum()}"
        if values.size == 0:
            assert row["median"] == "—"
            continue
        q1, q3 = np.percentile(values, [25, 75])
        assert float(row["median"]) == pytest.approx(np.median(values), rel=1e-3, abs=1e-9)
        assert float(row["Q1"]) == pytest.approx(q1, rel=1e-3, abs=1e-9)
        assert float(row["IQR"]) == pytest.approx(q3 - q1, rel=2e-3, abs=1e-9)


def test_session_page_lists_protocol_and_settings_and_links_every_output(run):
    out, provenances, pages = run
    provenance = json.loads(Path(provenances["sub-02"][0]).read_text())
    page_path = pages["sub-02"]
    page = Page(page_path.read_text(encoding="utf-8"))
    protocol = page.table("volume")
    expected = provenance["preprocessing"]["protocol"]
    assert [float(r["PLD (s)"]) for r in protocol] == pytest.approx(expected["pld"])
    assert [float(r["label duration τ (s)"]) for r in protocol] == pytest.approx(expected["label_duration"])
    assert [r["crushed"] == "yes" for r in protocol] == expected["crushed"]
    assert {r["constant"]: r["value"] for r in page.table("constant")}["t1b"] == "1.65"
    text = " ".join(page.text)
    assert '"resolution_s": 0.05' in text and provenance["settings_digest"] in text
    assert provenance["decision"]["reason"] in text  # what the protocol determines, as decided
    files = [href for href in page.links if not href.startswith("#")]
    targets = {(page_path.parent / unquote(href)).resolve() for href in files}
    assert all(t.is_file() for t in targets)
    listed = {(out / o["path"]).resolve() for o in provenance["outputs"]}
    assert listed | {Path(provenances["sub-02"][0]).resolve()} == targets


def test_index_links_each_session_page_with_thumbnails_and_escaped_reasons(run):
    out, provenances, pages = run
    entries = [
        IndexEntry("sub-01", "done", "", provenances["sub-01"]),
        IndexEntry("sub-02", "skipped", "", provenances["sub-02"]),
        IndexEntry("sub-03", "failed", "BidsError: <script>alert(1)</script> & more",
                   (out / "sub-03" / "perf" / "sub-03_provenance.json",)),
    ]
    index_path = write_run_index(out, entries, run_id="20260101T000000Z-1")
    assert index_path == out / QC_INDEX_NAME
    text = index_path.read_text(encoding="utf-8")
    assert "<script>" not in text and "&lt;script&gt;" in text
    page = Page(text)
    rows = page.table("session")
    assert [(r["session"], r["status"]) for r in rows] == [
        ("sub-03", "failed"), ("sub-01", "done"), ("sub-02", "up to date")]
    assert "no outputs" in rows[0]["acquisitions"]
    assert "lm " in rows[1]["acquisitions"] and "% converged" in rows[1]["acquisitions"]
    links = [(out / unquote(urlsplit(href).path)).resolve() for href in page.links]
    assert links == [pages["sub-01"].resolve(), pages["sub-02"].resolve()]
    for image in page.images:
        assert _colours(_png(image["src"])) > 20
    assert len(page.images) == 2
    assert "out of date" not in text


def test_index_flags_a_page_older_than_its_provenance(run):
    out, provenances, pages = run
    provenance = Path(provenances["sub-01"][0])
    original = provenance.read_bytes()
    try:
        provenance.write_bytes(original + b"\n")  # outputs rewritten, page not
        text = write_run_index(out, [IndexEntry("sub-01", "done", "", (provenance,))]).read_text()
        assert "page out of date" in text
    finally:
        provenance.write_bytes(original)


def test_unknown_status_in_an_entry_is_refused(run):
    out, _, _ = run
    with pytest.raises(ValueError, match="status"):
        write_run_index(out, [IndexEntry("sub-01", "ok")])


def _single_slice_session(out: Path) -> Path:
    """A 1C acquisition of one slice where every voxel is invalid: every map all-NaN."""
    shape = (7, 6, 1)
    mask = np.zeros(shape, bool)
    mask[1:6, 1:5, 0] = True
    n = int(mask.sum())
    model = get_model("1c", default_protocol("1c"))
    prepared = PreparedData(signals=np.full((n, model.n_volumes), np.nan), protocol=model.protocol, mask=mask,
                            affine=np.diag([3.0, 3.0, 5.0, 1.0]), shape=shape, slice_offsets=np.zeros(n),
                            m0=np.ones(shape), constants=Constants(), notes=("all voxels invalid <test>",),
                            source_files=(), model="1c", source_name="sub-09")
    estimate = Estimate(params=np.full((n, 2), np.nan), status=np.full(n, int(Status.INVALID_INPUT), np.int8),
                        stderr=np.full((n, 2), np.nan), rss=np.full(n, np.nan), param_names=model.param_names,
                        method="lm")
    written = write_session_outputs(out, prepared, {"lm": estimate}, model, {"lm": {}})
    return written[-1]


def test_all_nan_single_slice_session_with_a_missing_file_renders(tmp_path):
    provenance = _single_slice_session(tmp_path)
    (provenance.parent / "sub-09_desc-lm_attse.nii.gz").unlink()
    page_path = write_session_report(provenance)
    page = Page(page_path.read_text(encoding="utf-8"))
    text = " ".join(page.text)
    assert "sub-09_desc-lm_attse.nii.gz is missing" in text and "all voxels invalid <test>" in text
    [status] = page.table("method", "voxels")
    assert status["3 invalid_input"] == "100.0 % (20)"
    stats = {r["map"]: r for r in page.table("method", "map")}
    assert stats["cbf"]["median"] == "—" and stats["cbf"]["finite / mask"] == "0 / 20"
    assert "attse" not in stats
    grey_on_white = {to_hex(NO_VALUE), to_hex(BACKGROUND)}
    for image in page.images:
        alt, pixels = image["alt"], _png(image["src"])
        shown = {to_hex(c) for c in np.unique(pixels[..., :3].reshape(-1, 3), axis=0)}
        if alt.endswith("histogram"):  # a grid, no line
            assert _colours(pixels) > 1 and "no finite value in the brain mask" in text
        elif alt.endswith("status"):  # every voxel invalid
            assert shown == {STATUS_COLOURS[int(Status.INVALID_INPUT)], to_hex(BACKGROUND)}
        else:  # all-NaN maps: grey brain on white, one slice
            assert shown == grey_on_white, alt
    assert {"lm cbf", "lm att", "lm cbfse", "lm status", "cbf histogram"} <= {i["alt"] for i in page.images}


def test_index_notes_a_session_without_a_page_and_refuses_a_path_that_is_not_a_provenance(tmp_path):
    provenance = _single_slice_session(tmp_path)
    text = write_run_index(tmp_path, [IndexEntry("sub-09", "done", "", (provenance,))]).read_text()
    assert "(no QC page)" in text and "lm 0 % converged" in text
    with pytest.raises(ValueError, match="provenance"):
        write_run_index(tmp_path, [IndexEntry("sub-09", "done", "", (provenance.with_name("x.json"),))])


def test_missing_mask_or_bad_provenance_raise_and_write_nothing(tmp_path):
    provenance = _single_slice_session(tmp_path)
    (provenance.parent / "sub-09_desc-brain_mask.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match="brain mask"):
        write_session_report(provenance)
    provenance.write_text("{}")
    with pytest.raises(ValueError, match="provenance"):
        write_session_report(provenance)
    with pytest.raises(ValueError, match="provenance"):
        session_report_path(provenance.with_name("sub-09_desc-lm_cbf.json"))
    assert not session_report_path(provenance).exists()
    assert not [p for p in tmp_path.rglob("*") if "aslbatch-tmp" in p.name]


def test_display_is_radiological_whatever_the_stored_orientation(tmp_path):
    """Values on the patient's right show on the left of the tile, anterior at the top."""
    data = np.zeros((8, 6, 2))
    data[:4] = 1.0  # voxel x 0..3: with a flipped x axis (LAS), these lie on the patient's right
    data[:, -1] = 2.0  # the last y row: anterior
    path = tmp_path / "las.nii.gz"
    nib.save(nib.Nifti1Image(data, np.diag([-3.0, 3.0, 3.0, 1.0])), path)
    tile = _tile(_load(path)[0], 0)
    assert tile.shape == (6, 8)
    assert (tile[0] == 2).all()  # anterior row on top
    assert (tile[1:, :4] == 1).all() and (tile[1:, 4:] == 0).all()  # patient's right on the left


def test_every_parameter_and_its_standard_error_has_a_fixed_scale():
    """Fixed, except the quantities in the scanner's units (ΔM without M0): those are scaled to the
    data, 0 to the 99th percentile (checked against numpy's percentile)."""
    assert set(SCALES) == set(parameter_table()) | {p + k for p in parameter_table() for k in ("se", "ci95")}
    for param in set(parameter_table()) - {"deltam"}:  # a 95 % half-width is 1.96 Gaussian standard errors
        assert SCALES[param + "ci95"].hi == pytest.approx(1.959963984540054 * SCALES[param + "se"].hi, rel=1e-12)
    scanner_units = {name for name, spec in parameter_table().items() if spec.units == "scanner units"}
    assert scanner_units == {"deltam"}
    assert all(s.lo < s.hi for q, s in SCALES.items()
               if q.removesuffix("se").removesuffix("ci95") not in scanner_units)
    values = np.random.default_rng(0).gamma(2.0, 30.0, 500)
    for quantity in ("deltam", "deltamse", "deltamci95"):
        assert _data_scale(quantity, values).hi == pytest.approx(np.percentile(values, 99), rel=1e-12)
    assert _data_scale("cbf", values) == SCALES["cbf"]
    assert SCALES["cbf"].lo == 0 and SCALES["cbf"].hi == 100 and SCALES["att"].hi == 3.5


def test_bidsignore_patterns_cover_every_page_and_nothing_else(run):
    out, provenances, pages = run
    index = write_run_index(out, [])

    def ignored(path: Path) -> bool:  # .bidsignore semantics: "/x" from the dataset root, else any folder
        relative = path.relative_to(out).as_posix()
        return any(fnmatch(relative, p[1:]) if p.startswith("/") else fnmatch(path.name, p)
                   for p in OTHER_BIDSIGNORE if "qc" in p)

    assert all(ignored(p) for p in [index, *pages.values()])
    assert not any(ignored(p) for p in out.rglob("*") if p.suffix != ".html")


@pytest.mark.parametrize("session, model", [("sub-01", "1c"), ("sub-02", "2c")])
def test_prior_dominated_shares_match_the_stderr_maps(run, session, model):
    """The page's share per parameter equals the share of mask voxels whose lm se is undefined or above
    PRIOR_SHARE x the prior SD, recomputed from the se and parameter maps (lut gives no se: no row)."""
    from aslbatch.estimators.prior import PRIOR_SHARE, prior_sd

    out, provenances, pages = run
    perf = pages[session].parent
    page = Page(pages[session].read_text(encoding="utf-8"))
    mask = _load_map(perf / f"{session}_desc-brain_mask.nii.gz") > 0
    fitted = get_model(model, default_protocol(model))
    params = fitted.param_names
    [row] = page.table("method", *params)
    assert row["method"] == "lm"
    limit = PRIOR_SHARE * prior_sd(fitted)
    for j, param in enumerate(params):
        value = _load_map(perf / f"{session}_desc-lm_{param}.nii.gz")[mask]
        se = _load_map(perf / f"{session}_desc-lm_{param}se.nii.gz")[mask]
        # the maps are float32: compare away from the threshold's rounding
        expected = np.isfinite(value) & ~(se <= limit[j])
        assert float(row[param].rstrip("%")) == pytest.approx(100 * expected.mean(), abs=0.011)
