"""The report's figures, drawn with matplotlib and embedded as inline SVG.

Why SVG: the figures are mostly lines and text. As vector graphics the text stays sharp
at any zoom, can be searched with Ctrl-F (layer names in the heatmap included: text is
written as ``<text>`` elements, ``svg.fonttype = "none"``), and a line of 2,000 points
costs ~25 kB. The one raster element, the per-layer heatmap, is embedded by matplotlib
inside the SVG as a PNG at the resolution it is drawn at (a few hundred kB at most).

matplotlib is imported lazily, and pyplot never: figures are plain
:class:`matplotlib.figure.Figure` objects rendered by the Agg-family canvases of
``savefig``, so neither the user's backend nor pyplot's figure registry is touched (no
figure is ever left open). Every string that reaches matplotlib from a log passes
through :func:`mpl_text`, which escapes ``$`` (else a layer name like ``a$b$`` would be
parsed as mathtext, and some names would make drawing fail); matplotlib's SVG writer
escapes ``&``, ``<``, ``>`` and quotes in text and attributes, which the tests check.
"""

from __future__ import annotations

import functools
import io
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gradguard.report.html import esc

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "EVENT_STYLE",
    "Layout",
    "bench_figure",
    "heatmap_figure",
    "loss_figure",
    "mpl_text",
    "norm_figure",
    "require_matplotlib",
    "to_svg",
]

_INSTALL_HINT = (
    "gradguard's HTML report draws its figures with matplotlib (and numpy): "
    "pip install 'gradguard[bench]' (or: pip install matplotlib)"
)

#: Marker, colour and legend label per event kind (unknown kinds get ``"other"``).
EVENT_STYLE: dict[str, tuple[str, str]] = {
    "spike": ("^", "#ef6c00"),
    "nonfinite": ("X", "#c62828"),
    "skip": ("v", "#8e24aa"),
    "rollback": ("s", "#6d0f0f"),
    "abort": ("*", "#000000"),
    "lr_backoff": ("D", "#1565c0"),
    "lr_restore": ("d", "#00838f"),
    "vanishing": ("o", "#6d4c41"),
    "high_clip_rate": ("|", "#b26a00"),
    "other": ("P", "#616161"),
}

_C_MEAN = "#1f4e99"
_C_BAND = "#9ebbe6"
_C_POST = "#2e7d32"
_C_THRESH = "#c62828"
_C_NONFINITE = "#e53935"
_C_NODATA = "#d6d9de"
_FIG_W = 12.0  # inches; the SVG is scaled to the page width


def require_matplotlib() -> tuple[Any, Any]:
    """Import matplotlib and numpy, or raise an ImportError that says how to install them.

    Returns:
        ``(matplotlib, numpy)``.
    """
    try:
        import matplotlib
        import numpy
        from matplotlib.figure import Figure  # noqa: F401  (fails on a broken install)
    except ImportError as e:
        raise ImportError(f"{_INSTALL_HINT}. Import error: {e}") from e
    return matplotlib, numpy


def mpl_text(s: Any, max_len: int | None = None) -> str:
    """Make a string safe for a matplotlib label: ``$`` escaped (no mathtext), control
    characters shown as escapes, and middle-truncated to ``max_len`` characters."""
    s = str(s)
    s = re.sub(r"[\x00-\x1f\x7f-\x9f]", lambda m: f"\\x{ord(m.group(0)):02x}", s)
    if max_len is not None and len(s) > max_len:
        keep = max_len - 1
        s = s[: (keep + 1) // 2] + "…" + s[len(s) - keep // 2 :]
    return s.replace("$", r"\$")


def _rc() -> dict[str, Any]:
    return {
        "svg.fonttype": "none",
        "font.family": "sans-serif",
        "font.sans-serif": ["DejaVu Sans", "Arial", "Helvetica", "Liberation Sans"],
        "font.size": 9.5,
        "axes.titlesize": 10.5,
        "axes.labelsize": 9.5,
        "xtick.labelsize": 8.5,
        "ytick.labelsize": 8.5,
        "legend.fontsize": 8.5,
        "axes.spines.top": False,
        "axes.spines.right": False,
        "axes.grid": True,
        "grid.color": "#e3e6eb",
        "grid.linewidth": 0.6,
        "axes.edgecolor": "#8a93a3",
        "axes.axisbelow": True,
        "path.simplify": True,
        "svg.image_inline": True,
    }


def _styled(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Build the figure under the report's rcParams (they apply when artists are made)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        matplotlib, _ = require_matplotlib()
        with matplotlib.rc_context(_rc()):
            return fn(*args, **kwargs)

    return wrapper


_SVG_STRIP = [
    re.compile(r"<\?xml[^>]*\?>\s*", re.S),
    re.compile(r"<!DOCTYPE[^>]*>\s*", re.S),
    re.compile(r"<metadata>.*?</metadata>\s*", re.S),
    re.compile(r"<!--.*?-->", re.S),
]
_SVG_ROOT = re.compile(r"<svg\b[^>]*>")


def to_svg(fig: Figure, *, uid: str, label: str = "") -> str:
    """Render ``fig`` as an inline-SVG fragment for an HTML page.

    The XML declaration, doctype, metadata, comments and namespace declarations are
    removed (an HTML parser assigns the SVG namespace itself, and none of them should
    put a URL in a self-contained page); the root keeps its ``viewBox`` but loses its
    fixed size, so CSS scales it to the page width.

    Args:
        fig: the figure (closed afterwards: its memory is released).
        uid: a page-unique id prefix: salts matplotlib's element ids so that two figures
            in one page never share a clip-path or marker id (and output is deterministic).
        label: plain-text description for screen readers (``aria-label``; escaped here).
    """
    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context({**_rc(), "svg.hashsalt": uid}):
        fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None}, dpi=110)
    fig.clear()
    svg = buf.getvalue()
    for pat in _SVG_STRIP:
        svg = pat.sub("", svg)
    m = _SVG_ROOT.search(svg)
    if m is None:  # pragma: no cover - matplotlib always writes one
        raise RuntimeError("matplotlib wrote no <svg> element")
    vb = re.search(r'viewBox="([^"]*)"', m.group(0))
    root = (
        f'<svg viewBox="{vb.group(1) if vb else ""}" version="1.1" role="img" '
        f'aria-label="{esc(label)}" preserveAspectRatio="xMidYMid meet">'
    )
    return svg[: m.start()] + root + svg[m.end() :]


# --------------------------------------------------------------------------------------
# Layout: every run figure has the same width and side margins, so x axes line up
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """Side margins (inches) shared by the figures of one page, so their x axes align."""

    left: float = 0.9
    right: float = 1.9
    width: float = _FIG_W

    def rect(self, fig_h: float, bottom: float, height: float) -> list[float]:
        """An ``add_axes`` rectangle (figure fractions) from inches."""
        return [
            self.left / self.width,
            bottom / fig_h,
            (self.width - self.left - self.right) / self.width,
            height / fig_h,
        ]


def _new_figure(height: float, width: float = _FIG_W) -> Figure:
    require_matplotlib()
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def _finite_pos(np: Any, a: Any) -> Any:
    a = np.asarray(a, dtype=float)
    return a[np.isfinite(a) & (a > 0)]


def _pos_or_nan(np: Any, a: Sequence[float]) -> Any:
    """Values for a log axis: non-positive and non-finite values become NaN (gaps)."""
    a = np.asarray(a, dtype=float)
    return np.where(np.isfinite(a) & (a > 0), a, np.nan)


def _marker_kw(n: int) -> dict[str, Any]:
    return {"marker": "o", "markersize": 3.5} if n <= 60 else {}


def _set_xlim(ax: Axes, xlim: tuple[float, float]) -> None:
    lo, hi = xlim
    if hi <= lo:
        lo, hi = lo - 1, hi + 1
    pad = 0.01 * (hi - lo)
    ax.set_xlim(lo - pad, hi + pad)


def _legend_right(ax: Axes, handles: Sequence[Any] | None = None, **kw: Any) -> None:
    args = {} if handles is None else {"handles": list(handles)}
    if handles is not None and not handles:
        return
    ax.legend(
        **args,
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        frameon=False,
        borderaxespad=0.0,
        handlelength=1.8,
        **kw,
    )


# --------------------------------------------------------------------------------------
# Run figures
# --------------------------------------------------------------------------------------


@_styled
def loss_figure(
    steps: Sequence[float],
    loss_mean: Sequence[float],
    loss_last: Sequence[float],
    *,
    xlim: tuple[float, float],
    layout: Layout,
    bad_steps: Sequence[float] = (),
) -> Figure:
    """Loss per interval (mean and last value) against the step.

    The y axis is logarithmic when every finite loss is positive and they span more than
    1.5 decades. ``bad_steps`` (intervals whose loss was non-finite) are marked with red
    crosses along the top edge.
    """
    _, np = require_matplotlib()
    h = 2.9
    fig = _new_figure(h, layout.width)
    ax = fig.add_axes(layout.rect(h, 0.5, h - 0.8))
    x = np.asarray(steps, dtype=float)
    mean = np.asarray(loss_mean, dtype=float)
    last = np.asarray(loss_last, dtype=float)
    vals = np.concatenate([mean[np.isfinite(mean)], last[np.isfinite(last)]])
    log = bool(vals.size) and bool((vals > 0).all()) and vals.max() / vals.min() > 10**1.5
    if log:
        ax.set_yscale("log")
    mk = _marker_kw(len(x))
    ax.plot(x, last, color="#90a4c8", lw=0.8, label="interval: last", **mk)
    ax.plot(x, mean, color=_C_MEAN, lw=1.6, label="interval: mean", **mk)
    if len(bad_steps):
        ax.plot(
            np.asarray(bad_steps, dtype=float),
            np.full(len(bad_steps), 0.97),
            ls="none",
            marker="x",
            color=_C_NONFINITE,
            markersize=6,
            mew=1.5,
            transform=ax.get_xaxis_transform(),
            label="non-finite loss",
            clip_on=False,
        )
    _set_xlim(ax, xlim)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss" + (" (log)" if log else ""))
    _legend_right(ax)
    return fig


@_styled
def norm_figure(
    series: Mapping[str, Sequence[float]],
    events: Sequence[tuple[float, str, float]],
    *,
    xlim: tuple[float, float],
    layout: Layout,
    nonfinite_steps: Sequence[float] = (),
) -> Figure:
    """The gradient-norm trace: an event lane, the norms, and the clip rate.

    Args:
        series: per (downsampled) interval: ``step`` (x), ``pre_min``, ``pre_mean``,
            ``pre_max``, ``post_mean``, ``threshold`` (inf: no clipping), ``clip_rate``
            (fraction).
        events: ``(step, kind, norm)``: one marker per event in the lane, on its kind's
            row; spikes with a finite norm are also marked at that norm.
        xlim: the step range shared with the other figures.
        layout: shared margins.
        nonfinite_steps: steps with non-finite gradients, drawn as faint red lines.
    """
    _, np = require_matplotlib()
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    kinds: list[str] = []
    for _, k, _ in events:
        if k not in kinds:
            kinds.append(k)
    order = {k: i for i, k in enumerate(EVENT_STYLE)}
    kinds.sort(key=lambda k: order.get(k, len(order)))
    lane_h = 0.24 * len(kinds) + 0.16 if kinds else 0.0
    norm_h, rate_h, gap, bottom = 3.3, 0.85, 0.14, 0.5
    h = bottom + rate_h + gap + norm_h + (gap + lane_h if kinds else 0.0) + 0.15
    fig = _new_figure(h, layout.width)
    ax_rate = fig.add_axes(layout.rect(h, bottom, rate_h))
    ax = fig.add_axes(layout.rect(h, bottom + rate_h + gap, norm_h), sharex=ax_rate)
    ax_lane = None
    if kinds:
        ax_lane = fig.add_axes(
            layout.rect(h, bottom + rate_h + gap + norm_h + gap, lane_h), sharex=ax_rate
        )

    x = np.asarray(series["step"], dtype=float)
    pmin = _pos_or_nan(np, series["pre_min"])
    pmean = _pos_or_nan(np, series["pre_mean"])
    pmax = _pos_or_nan(np, series["pre_max"])
    post = _pos_or_nan(np, series["post_mean"])
    thr = np.asarray(series["threshold"], dtype=float)
    thr = np.where(np.isfinite(thr) & (thr > 0), thr, np.nan)
    mk = _marker_kw(len(x))
    handles: list[Any] = []

    ax.set_yscale("log")
    lo_band = np.where(np.isnan(pmin), pmean, pmin)
    hi_band = np.where(np.isnan(pmax), pmean, pmax)
    if len(x) > 1:
        ax.fill_between(x, lo_band, hi_band, color=_C_BAND, alpha=0.55, lw=0, step=None)
    else:
        ax.vlines(x, lo_band, hi_band, color=_C_BAND, lw=6)
    handles.append(Patch(color=_C_BAND, alpha=0.55, label="pre-clip min\u2013max"))
    (ln,) = ax.plot(x, pmean, color=_C_MEAN, lw=1.4, label="pre-clip mean", **mk)
    handles.append(ln)
    if np.isfinite(post).any() and not np.allclose(
        np.nan_to_num(post), np.nan_to_num(pmean), rtol=1e-6
    ):
        (ln,) = ax.plot(x, post, color=_C_POST, lw=1.1, ls="--", label="post-clip mean", **mk)
        handles.append(ln)
    if np.isfinite(thr).any():
        (ln,) = ax.plot(
            x, thr, color=_C_THRESH, lw=1.2, drawstyle="steps-pre", label="clip threshold"
        )
        handles.append(ln)
    else:
        handles.append(Line2D([], [], color="none", label="no clip threshold"))

    nf = np.asarray(nonfinite_steps, dtype=float)
    if nf.size:
        ax.vlines(nf, 0, 1, transform=ax.get_xaxis_transform(), colors=_C_NONFINITE,
                  lw=0.9, alpha=0.45)
        handles.append(Line2D([], [], color=_C_NONFINITE, alpha=0.6, lw=1.2,
                              label="non-finite gradient"))

    spikes = [(s, n) for s, k, n in events if k == "spike" and math.isfinite(n) and n > 0]
    if spikes:
        m, c = EVENT_STYLE["spike"]
        ax.plot([s for s, _ in spikes], [n for _, n in spikes], ls="none", marker=m,
                color=c, mec="#3b2200", mew=0.6, markersize=7, zorder=5)
        handles.append(Line2D([], [], ls="none", marker=m, color=c, mec="#3b2200",
                              mew=0.6, markersize=7, label="spike (its norm)"))

    # y range: everything finite, but not stretched by a near-zero minimum.
    vals = np.concatenate([_finite_pos(np, a) for a in (pmin, pmean, pmax, post, thr)]
                          + [_finite_pos(np, [n for _, n in spikes])])
    if vals.size:
        typical = _finite_pos(np, pmean)
        floor = np.percentile(typical, 2) / 1e3 if typical.size else vals.min()
        lo, hi = max(vals.min(), floor), vals.max()
        ax.set_ylim(lo / 1.6, hi * 2.0)
    else:
        ax.set_ylim(0.1, 10)
        ax.text(0.5, 0.5, "no finite gradient norm in this log", transform=ax.transAxes,
                ha="center", va="center", color="#5b6474")
    ax.set_ylabel("gradient norm (log)")
    ax.tick_params(labelbottom=False)
    _legend_right(ax, handles)

    _clip_rate_axes(np, ax_rate, x, series["clip_rate"], xlim)
    if ax_lane is not None:
        _event_lane(ax_lane, events, kinds)
    return fig


def _clip_rate_axes(np: Any, ax: Axes, x: Any, clip_rate: Sequence[float],
                    xlim: tuple[float, float]) -> None:
    """The bottom of the norm figure: the share of steps clipped per interval."""
    rate = np.asarray(clip_rate, dtype=float) * 100.0
    if len(x) > 1:
        ax.fill_between(x, np.nan_to_num(rate), step="pre", color="#b0bec5", lw=0)
        ax.plot(x, rate, drawstyle="steps-pre", color="#546e7a", lw=0.9)
    else:
        ax.bar(x, np.nan_to_num(rate), width=1.0, color="#b0bec5")
    ax.set_ylim(0, 105)
    ax.set_yticks([0, 50, 100])
    ax.set_ylabel("clipped\n(% of steps)")
    ax.set_xlabel("optimizer step")
    _set_xlim(ax, xlim)


def _event_lane(ax: Axes, events: Sequence[tuple[float, str, float]], kinds: list[str]) -> None:
    """The top of the norm figure: one row per event kind, a marker at each event's step."""
    rows = {k: i for i, k in enumerate(kinds)}
    for k in kinds:
        m, c = EVENT_STYLE.get(k, EVENT_STYLE["other"])
        xs = [s for s, kk, _ in events if kk == k]
        ax.plot(xs, [rows[k]] * len(xs), ls="none", marker=m, color=c,
                markersize=7 if m != "|" else 10, mew=1.6 if m == "|" else 0.5,
                mec=c if m == "|" else "white", clip_on=False)
    ax.set_ylim(len(kinds) - 0.4, -0.6)
    ax.set_yticks(range(len(kinds)))
    ax.set_yticklabels([mpl_text(k, 18) for k in kinds])
    ax.tick_params(labelbottom=False, length=0)
    ax.grid(axis="x", visible=False)
    for side in ("left", "bottom"):
        ax.spines[side].set_visible(False)
    ax.set_title("events", loc="left", fontsize=9, color="#5b6474", pad=2)


def _as_floats(np: Any, row: Sequence[Any]) -> Any:
    """A float vector from a log's list: None and unreadable entries become NaN."""
    try:
        return np.asarray(row, dtype=float)  # None -> nan, "NaN"/"Infinity" parsed
    except (TypeError, ValueError):
        out = []
        for x in row:
            try:
                out.append(float(x) if x is not None else math.nan)
            except (TypeError, ValueError):
                out.append(math.nan)
        return np.asarray(out, dtype=float)


def _matrix(np: Any, rows: Sequence[Sequence[Any]], n_layers: int) -> Any:
    """``(n_layers, len(rows))``: one column per interval, short rows padded with NaN."""
    if rows and all(isinstance(r, list) and len(r) == n_layers for r in rows):
        try:
            return np.asarray(rows, dtype=float).T.reshape(n_layers, len(rows))
        except (TypeError, ValueError):
            pass  # some odd entry: row by row
    m = np.full((n_layers, len(rows)), np.nan)
    for j, r in enumerate(rows):
        a = _as_floats(np, list(r) if isinstance(r, (list, tuple)) else [])[:n_layers]
        m[: a.size, j] = a
    return m


def _block_rows(np: Any, logv: Any, bad: Any, names: Sequence[str], max_rows: int) -> Any:
    """Merge consecutive layers into blocks when there are more than ``max_rows``:
    a block shows its largest value and is non-finite if any member is."""
    n = logv.shape[0]
    if n <= max_rows:
        return logv, bad, [mpl_text(s, 42) for s in names], 1
    k = math.ceil(n / max_rows)
    nb = math.ceil(n / k)
    pad = nb * k - n
    lv = np.concatenate([logv, np.full((pad, logv.shape[1]), np.nan)])
    bd = np.concatenate([bad, np.zeros((pad, bad.shape[1]), dtype=bool)])
    lv = lv.reshape(nb, k, -1)
    with np.errstate(all="ignore"):
        allnan = np.isnan(lv).all(axis=1)
        merged = np.where(allnan, np.nan, np.nanmax(np.where(np.isnan(lv), -np.inf, lv), axis=1))
    labels = []
    for b in range(nb):
        first, last = b * k, min(n, (b + 1) * k) - 1
        labels.append(f"{mpl_text(names[first], 34)} (+{last - first})")
    return merged, bd.reshape(nb, k, -1).any(axis=1), labels, k


@_styled
def heatmap_figure(
    names: Sequence[str],
    step_first: Sequence[float],
    step_last: Sequence[float],
    values: Sequence[Sequence[float]],
    nonfinite: Sequence[Sequence[float]],
    *,
    layout: Layout,
    xlim: tuple[float, float],
    max_cols: int = 700,
    max_rows: int = 200,
) -> tuple[Figure, str]:
    """Per-layer gradient norm over steps: layers on y (model order, top to bottom),
    steps on x, colour = log10 of the interval's mean norm of that tensor.

    Intervals are merged into at most ``max_cols`` columns (geometric mean of the
    finite values; non-finite if any merged interval was) and layers into at most
    ``max_rows`` blocks of consecutive tensors (their largest value). Grey: no gradient
    (or no finite value) in the cell; red: a non-finite norm.

    Args:
        names: the tensor names (``meta["names"]``).
        step_first, step_last: per interval.
        values: per interval, the ``layer_norm_mean`` list (aligned with ``names``).
        nonfinite: per interval, the ``layer_nonfinite`` counts.

    Returns:
        ``(figure, caption note)``: the note says what was merged.
    """
    _, np = require_matplotlib()
    from matplotlib import colormaps
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    n_layers, n_int = len(names), len(values)
    v = _matrix(np, values, n_layers)
    bad = np.nan_to_num(_matrix(np, nonfinite, n_layers)) > 0
    with np.errstate(all="ignore"):
        logv = np.where(np.isfinite(v) & (v > 0), np.log10(v), np.nan)

    # columns: merge consecutive intervals
    notes = []
    kc = max(1, math.ceil(n_int / max_cols))
    if kc > 1:
        nc = math.ceil(n_int / kc)
        pad = nc * kc - n_int
        lv = np.concatenate([logv, np.full((n_layers, pad), np.nan)], axis=1)
        bd = np.concatenate([bad, np.zeros((n_layers, pad), dtype=bool)], axis=1)
        with np.errstate(all="ignore"):
            lv3 = lv.reshape(n_layers, nc, kc)
            cnt = np.isfinite(lv3).sum(axis=2)
            logv = np.where(cnt > 0, np.nansum(lv3, axis=2) / np.maximum(cnt, 1), np.nan)
        bad = bd.reshape(n_layers, nc, kc).any(axis=2)
        notes.append(f"each column merges {kc} log intervals (geometric mean)")
    if bad.shape[1] > 250 and bad.any():  # a lone non-finite column would be ~1 px wide
        r = bad.shape[1] // 250
        wide = bad.copy()
        for s in range(1, r + 1):
            wide[:, s:] |= bad[:, :-s]
            wide[:, :-s] |= bad[:, s:]
        bad = wide
        notes.append("non-finite cells are widened to stay visible")
    logv, bad, labels, kr = _block_rows(np, logv, bad, names, max_rows)
    if kr > 1:
        notes.append(f"each row merges {kr} consecutive tensors (their largest norm)")
    n_rows = logv.shape[0]

    label_pt = 7.5
    axes_h = min(max(n_rows * 0.17, 1.4), 8.0)
    per_in = 72.0 / (label_pt * 1.35)  # tick labels that fit per inch
    every = max(1, math.ceil(n_rows / (axes_h * per_in)))
    h = axes_h + 0.85
    fig = _new_figure(h, layout.width)
    ax = fig.add_axes(layout.rect(h, 0.5, axes_h))
    ax.grid(False)
    x0 = float(step_first[0]) - 0.5 if len(step_first) else 0.0
    x1 = float(step_last[-1]) + 0.5 if len(step_last) else 1.0
    finite = logv[np.isfinite(logv)]
    cmap = colormaps["viridis"].with_extremes(bad=_C_NODATA)
    if finite.size:
        vmin, vmax = float(np.percentile(finite, 1)), float(finite.max())
        if vmax - vmin < 1e-6:
            vmin, vmax = vmin - 0.5, vmax + 0.5
    else:
        vmin, vmax = -1.0, 1.0
    im = ax.imshow(
        np.ma.masked_invalid(logv), aspect="auto", interpolation="nearest", cmap=cmap,
        vmin=vmin, vmax=vmax, extent=(x0, x1, n_rows - 0.5, -0.5), origin="upper",
    )
    if bad.any():
        red = np.ma.masked_where(~bad, np.ones(bad.shape))
        ax.imshow(
            red, aspect="auto", interpolation="nearest",
            cmap=ListedColormap([_C_NONFINITE]), vmin=0, vmax=1,
            extent=(x0, x1, n_rows - 0.5, -0.5), origin="upper",
        )
    ticks = list(range(0, n_rows, every))
    ax.set_yticks(ticks)
    ax.set_yticklabels([labels[i] for i in ticks], fontsize=label_pt)
    ax.set_ylim(n_rows - 0.5, -0.5)
    _set_xlim(ax, xlim)
    ax.set_xlabel("optimizer step")
    for side in ("left", "bottom"):
        ax.spines[side].set_visible(False)

    # colorbar and legend in the right margin
    w = layout.width
    cb_h = min(axes_h, 3.0)
    cax = fig.add_axes([
        (w - layout.right + 0.25) / w, (0.5 + axes_h - cb_h) / h, 0.16 / w, cb_h / h
    ])
    cb = fig.colorbar(im, cax=cax)
    cb.set_label("log₁₀ mean gradient norm", fontsize=8.5)
    cb.ax.tick_params(labelsize=8)
    leg = [Patch(color=_C_NODATA, label="no gradient")]
    if bad.any():
        leg.append(Patch(color=_C_NONFINITE, label="non-finite"))
    fig.legend(handles=leg, loc="upper left", frameon=False, fontsize=8,
               bbox_to_anchor=((w - layout.right + 0.12) / w, (0.45 + axes_h - cb_h) / h))
    note = "; ".join(notes)
    return fig, note


# --------------------------------------------------------------------------------------
# Benchmark figures
# --------------------------------------------------------------------------------------

_METHOD_COLORS = [
    "#000000", "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b",
    "#e377c2", "#17becf", "#bcbd22", "#7f7f7f", "#393b79", "#e7ba52", "#637939",
]
_METHOD_STYLES = ["-", "--", "-.", ":"]


@_styled
def bench_figure(
    lines: Sequence[Mapping[str, Any]],
    *,
    metric: str,
    higher_is_better: bool | None,
    trivial: float | None = None,
    method_order: Sequence[str] = (),
) -> Figure:
    """Metric against learning rate for one task, one line per method.

    Args:
        lines: per method: ``method`` (name), ``lr`` (list), ``mean``, ``lo``, ``hi``
            (mean and min/max over seeds per lr), ``n_div`` and ``n`` (diverged seeds
            and seeds per lr).
        metric: the metric's name (y label).
        higher_is_better: the metric's direction (shown in the label; ``None``: unknown).
        trivial: the trivial predictor's score, drawn as a dashed line.
        method_order: every method of the page, in order: a method gets the same colour
            and line style in every task's figure.
    """
    _, np = require_matplotlib()
    from matplotlib.lines import Line2D

    h = 4.0
    layout = Layout(left=0.9, right=2.4)
    fig = _new_figure(h, layout.width)
    ax = fig.add_axes(layout.rect(h, 0.55, h - 0.85))
    ax.set_xscale("log")
    allv = []
    for ln in lines:
        for key in ("mean", "lo", "hi"):
            allv += [float(v) for v in ln[key] if v is not None and math.isfinite(float(v))]
    if trivial is not None and math.isfinite(trivial):
        allv.append(trivial)
    pos = [v for v in allv if v > 0]
    logy = (
        higher_is_better is False and allv and len(pos) == len(allv)
        and max(pos) / min(pos) > 10**1.2
    )
    if logy:
        ax.set_yscale("log")
    any_div = False
    slot = {m: i for i, m in enumerate(method_order)}
    for k, ln in enumerate(lines):
        i = slot.get(str(ln["method"]), len(slot) + k)
        color = _METHOD_COLORS[i % len(_METHOD_COLORS)]
        style = _METHOD_STYLES[(i // len(_METHOD_COLORS)) % len(_METHOD_STYLES)]
        lr = np.asarray(ln["lr"], dtype=float)
        mean = np.asarray([np.nan if v is None else v for v in ln["mean"]], dtype=float)
        lo = np.asarray([np.nan if v is None else v for v in ln["lo"]], dtype=float)
        hi = np.asarray([np.nan if v is None else v for v in ln["hi"]], dtype=float)
        if len(lr) > 1 and np.isfinite(lo).any():
            ax.fill_between(lr, lo, hi, color=color, alpha=0.10, lw=0)
        ax.plot(lr, mean, color=color, ls=style, lw=1.6, marker="o", markersize=4,
                label=mpl_text(ln["method"], 28))
        ndiv = np.asarray(ln.get("n_div") or [0] * len(lr), dtype=float)
        d = ndiv > 0
        if d.any():
            any_div = True
            ax.plot(lr[d], mean[d], ls="none", marker="X", markersize=9, color=color,
                    mec="#b71c1c", mew=1.3, zorder=5)
    if trivial is not None and math.isfinite(trivial):
        ax.axhline(trivial, color="#616161", ls=(0, (4, 3)), lw=1.0)
    handles, _ = ax.get_legend_handles_labels()
    if trivial is not None and math.isfinite(trivial):
        handles.append(Line2D([], [], color="#616161", ls=(0, (4, 3)), lw=1.0,
                              label="trivial predictor"))
    if any_div:
        handles.append(Line2D([], [], ls="none", marker="X", markersize=9, color="#9e9e9e",
                              mec="#b71c1c", mew=1.3, label="≥1 seed diverged"))
    _legend_right(ax, handles)
    arrow = {True: " (higher is better ↑)", False: " (lower is better ↓)"}.get(
        higher_is_better, ""
    )
    ax.set_ylabel(mpl_text(metric, 30) + arrow + (", log" if logy else ""))
    ax.set_xlabel("learning rate (log)")
    return fig
