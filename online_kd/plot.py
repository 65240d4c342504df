"""Pictures of a topology graph and of training curves (PNG, headless).

:func:`draw_topology` renders the distillation graph declared by a topology YAML (peers,
ensembles, virtual teachers; edges = distillation losses) so that a run's artifacts show what was
trained; :func:`plot_curves` draws one line per node (e.g. top-1 accuracy per epoch).

Rendering uses matplotlib's object API (``Figure`` + the Agg canvas) and never pyplot: no
display is needed, no global figure state is touched (safe in threads and callbacks), and
figures cannot leak. The Agg backend is also selected (``matplotlib.use("Agg")``) when no
backend was chosen and pyplot is not imported yet, for code that imports pyplot afterwards.
"""

from __future__ import annotations

import inspect
import math
import os
import sys
from pathlib import Path
from typing import Any

import matplotlib

if "MPLBACKEND" not in os.environ and "matplotlib.pyplot" not in sys.modules:
    # No display: select Agg unless a backend was chosen explicitly or pyplot is already in use
    # (switching then would close the user's figures). Our own drawing never needs pyplot.
    matplotlib.use("Agg")

from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import FancyArrowPatch, Patch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from matplotlib.transforms import Bbox  # noqa: E402

__all__ = ["draw_topology", "plot_curves"]

# Node styles per kind: (boxstyle, facecolor, edgecolor, linestyle, hatch, legend label).
_STYLES: dict[str, tuple[str, str, str, str, str | None, str]] = {
    "peer": ("round,pad=0.45", "#cfe3f7", "#1f5f9e", "-", None, "peer (trained)"),
    "frozen": ("round,pad=0.45", "#e3e3e3", "#6b6b6b", "--", "///", "peer (frozen)"),
    "ensemble": ("round4,pad=0.55", "#ffd9a8", "#b35c00", "-", None, "ensemble"),
    "virtual": ("sawtooth,pad=0.5", "#d9f2d0", "#2f7d1f", "-", None, "virtual teacher"),
    "other": ("square,pad=0.45", "#f2d0f0", "#7d1f78", "-", None, "other"),
}
_EDGE_COLORS = [
    "#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e",
    "#8c564b", "#e377c2", "#17becf", "#7f7f7f", "#bcbd22",
]  # fmt: skip


_HATCH_COLOR = "#b0b0b0"  # light, so the label stays readable on top of the hatching


def _hatch_kw(hatch: str | None) -> dict[str, Any]:
    """``hatchcolor`` where this matplotlib supports it (3.10+); older ones use the edge colour."""
    if hatch and "hatchcolor" in inspect.signature(Patch.__init__).parameters:
        return {"hatchcolor": _HATCH_COLOR}
    return {}


def _node_style_key(node: dict) -> str:
    kind = str(node.get("kind", "peer"))
    if kind == "peer":
        return "frozen" if node.get("frozen") else "peer"
    return kind if kind in _STYLES else "other"


def _layout(names: list[str], edges: list[tuple[str, str]]) -> dict[str, tuple[float, float]]:
    """Circular layout for <= 8 nodes (starting at the top, clockwise), else a seeded spring
    layout; positions normalised to fit in [-1, 1]."""
    import networkx as nx

    n = len(names)
    if n == 1:
        return {names[0]: (0.0, 0.0)}
    if n <= 8:
        # Two nodes side by side (first on the left); more nodes start at 12 o'clock.
        start = math.pi if n == 2 else math.pi / 2
        return {
            name: (math.cos(start - 2 * math.pi * i / n), math.sin(start - 2 * math.pi * i / n))
            for i, name in enumerate(names)
        }
    g = nx.DiGraph()
    g.add_nodes_from(names)
    g.add_edges_from((u, v) for u, v in edges if u != v)
    pos = nx.spring_layout(g, seed=0, k=2.0 / math.sqrt(n), iterations=200)
    xs = [p[0] for p in pos.values()]
    ys = [p[1] for p in pos.values()]
    cx, cy = (max(xs) + min(xs)) / 2, (max(ys) + min(ys)) / 2
    scale = max(max(xs) - min(xs), max(ys) - min(ys)) / 2 or 1.0
    return {k: ((float(p[0]) - cx) / scale, (float(p[1]) - cy) / scale) for k, p in pos.items()}


def _edge_text(edge: dict) -> str:
    loss = str(edge.get("loss") or "").strip()
    label = str(edge.get("label") or "").strip()
    if loss and label and label != loss:
        return f"{loss}\n{label}"
    return loss or label


def _arc_midpoint(p0, p1, rad: float) -> tuple[float, float]:
    """Midpoint of matplotlib's ``arc3,rad=rad`` quadratic Bezier from p0 to p1 (valid in data
    coordinates because the axes use an equal aspect)."""
    (x0, y0), (x1, y1) = p0, p1
    dx, dy = x1 - x0, y1 - y0
    return ((x0 + x1) / 2 + 0.5 * rad * dy, (y0 + y1) / 2 - 0.5 * rad * dx)


def draw_topology(
    nodes: list[dict],
    edges: list[dict],
    path: str | os.PathLike,
    title: str | None = None,
) -> Path:
    """Draw the distillation graph as a PNG at ``path`` (parent folders created) and return it.

    ``nodes``: dicts with ``name``, ``kind`` ('peer' | 'ensemble' | 'virtual'), ``label`` (e.g.
    the model name) and ``frozen``. ``edges``: dicts with ``source``, ``target``, ``loss`` and
    ``label``. Peers are rounded boxes labelled ``name\\nlabel``; frozen peers are grey, hatched,
    dashed and marked "(frozen)"; ensembles and virtual teachers get their own shapes/colours.
    Edges are arrows coloured by loss and labelled ``loss`` (+ ``label``); mutual edges and
    parallel edges are curved apart so each stays visible; self-edges are loops pointing away
    from the centre. Layout: circle for <= 8 nodes, seeded spring layout above. A legend
    explains the node kinds. Raises ``ValueError`` for edges to undeclared nodes.
    """
    path = Path(path)
    names = [str(n["name"]) for n in nodes]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate node names in {names}")
    by_name = {str(n["name"]): n for n in nodes}
    pairs = [(str(e["source"]), str(e["target"])) for e in edges]
    missing = sorted({x for p in pairs for x in p} - set(by_name))
    if missing:
        raise ValueError(f"edges refer to undeclared nodes: {missing}")

    pos = _layout(names, pairs)
    n = len(names)
    # Fixed scale (inches per layout unit) with the axes filling the figure; once everything
    # is placed, limits and figure size are shrunk together to the content (same scale, so the
    # boxes keep their size in data units) and the title/legend are added around it.
    scale = 2.3 if n <= 8 else max(2.3, 0.75 * math.sqrt(n))
    xs = [p[0] for p in pos.values()]
    ys = [p[1] for p in pos.values()]
    lim_x = (min(xs) - 0.9, max(xs) + 0.9)
    lim_y = (min(ys) - 0.9, max(ys) + 0.9)
    dpi = 110
    fig = Figure(figsize=((lim_x[1] - lim_x[0]) * scale, (lim_y[1] - lim_y[0]) * scale), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.0, 0.0, 1.0, 1.0))
    ax.set_axis_off()
    ax.set_xlim(*lim_x)
    ax.set_ylim(*lim_y)
    fontsize = 10 if n <= 8 else 8
    # Nodes: text boxes whose bbox patches also clip the arrows (arrows end at the border).
    boxes = {}
    kinds_present: list[str] = []
    for name in names:
        node = by_name[name]
        key = _node_style_key(node)
        if key not in kinds_present:
            kinds_present.append(key)
        boxstyle, face, edge, ls, hatch, _ = _STYLES[key]
        label = str(node.get("label") or "").strip()
        text = name if not label or label == name else f"{name}\n{label}"
        if key == "frozen":
            text += "\n(frozen)"
        t = ax.text(
            *pos[name], text, ha="center", va="center", fontsize=fontsize, zorder=3,
            fontweight="bold" if key != "frozen" else "normal",
            color="#222222" if key != "frozen" else "#333333",
            bbox=dict(boxstyle=boxstyle, facecolor=face, edgecolor=edge, linewidth=1.6,
                      linestyle=ls, hatch=hatch, **_hatch_kw(hatch)),
        )  # fmt: skip
        boxes[name] = t.get_bbox_patch()

    # Edge colours by loss name (stable order of first appearance).
    loss_names: list[str] = []
    for e in edges:
        ln = str(e.get("loss") or "")
        if ln not in loss_names:
            loss_names.append(ln)
    loss_color = {ln: _EDGE_COLORS[i % len(_EDGE_COLORS)] for i, ln in enumerate(loss_names)}

    # Curvature per edge: unique per ordered pair; mutual pairs bend to opposite sides.
    groups: dict[frozenset, dict[tuple[str, str], list[int]]] = {}
    for i, (u, v) in enumerate(pairs):
        groups.setdefault(frozenset((u, v)), {}).setdefault((u, v), []).append(i)
    rads: dict[int, float] = {}
    for group in groups.values():
        mutual = len(group) == 2
        for idx in group.values():
            for k, i in enumerate(idx):
                if mutual:
                    rads[i] = 0.22 + 0.22 * k
                else:  # 0, +0.3, -0.3, +0.6, ...
                    rads[i] = 0.0 if k == 0 else 0.3 * ((k + 1) // 2) * (1 if k % 2 else -1)

    # Box sizes in data units (needs one draw) so that self-loops clear their box.
    fig.canvas.draw()
    inv = ax.transData.inverted()
    half: dict[str, tuple[float, float]] = {}
    for name, patch in boxes.items():
        (x0, y0), (x1, y1) = inv.transform(patch.get_window_extent().get_points())
        half[name] = (abs(x1 - x0) / 2, abs(y1 - y0) / 2)

    loops_seen: dict[str, int] = {}
    for i, e in enumerate(edges):
        u, v = pairs[i]
        color = loss_color[str(e.get("loss") or "")]
        text = _edge_text(e)
        common = dict(arrowstyle="-|>", mutation_scale=16, linewidth=1.6, color=color, zorder=4)
        if u == v:
            # Loop leaving and re-entering the top edge of the box (the bottom edge for nodes
            # in the lower half, away from the centre); stacked loops grow taller. Endpoints
            # are put on the border explicitly: patch clipping cannot split a single Bezier
            # segment that starts and ends inside the same patch.
            k = loops_seen.get(u, 0)
            loops_seen[u] = k + 1
            x, y = pos[u]
            hw, hh = half[u]
            up = 1.0 if y >= -1e-9 else -1.0
            dx = max(0.04, min(0.45 * hw, 0.12))
            a, b = (x - dx, y + up * hh), (x + dx, y + up * hh)
            apex = 0.16 + 0.1 * k  # height of the loop above the box edge
            rad = -up * apex / dx
            arrow = FancyArrowPatch(
                a, b, connectionstyle=f"arc3,rad={rad}", shrinkA=0, shrinkB=0, **common
            )
            mx, my = x, y + up * (hh + apex + 0.015)
            va = "bottom" if up > 0 else "top"
        else:
            va = "center"
            rad = rads[i]
            arrow = FancyArrowPatch(
                pos[u], pos[v], connectionstyle=f"arc3,rad={rad}", patchA=boxes[u],
                patchB=boxes[v], shrinkA=2, shrinkB=3, **common,
            )  # fmt: skip
            mx, my = _arc_midpoint(pos[u], pos[v], rad)
            if rad == 0.0:  # straight: move the label towards the target so A->B and
                # a label of another edge crossing the centre do not sit on each other
                (x0, y0), (x1, y1) = pos[u], pos[v]
                mx, my = x0 + 0.58 * (x1 - x0), y0 + 0.58 * (y1 - y0)
        ax.add_patch(arrow)
        if text:
            ax.text(
                mx, my, text, ha="center", va=va, fontsize=fontsize - 1, color=color,
                zorder=5, bbox=dict(boxstyle="round,pad=0.2", facecolor="white",
                                    edgecolor=color, linewidth=0.6, alpha=0.9),
            )  # fmt: skip

    # Crop: union of every drawn artist, in data units, plus a small pad.
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    extents = [a.get_window_extent(renderer) for a in (*ax.texts, *ax.patches)]
    (x0, y0), (x1, y1) = inv.transform(Bbox.union(extents).get_points())
    pad = 0.04
    ax.set_xlim(x0 - pad, x1 + pad)
    ax.set_ylim(y0 - pad, y1 + pad)
    fig.set_size_inches((x1 - x0 + 2 * pad) * scale, (y1 - y0 + 2 * pad) * scale)
    if title:
        ax.set_title(title, fontsize=13, fontweight="bold", pad=10)

    handles: list[Any] = []
    for key in ["peer", "frozen", "ensemble", "virtual", "other"]:
        if key in kinds_present:
            _, face, edge, ls, hatch, lab = _STYLES[key]
            handles.append(
                Patch(facecolor=face, edgecolor=edge, linestyle=ls, hatch=hatch, label=lab,
                      **_hatch_kw(hatch))
            )
    for ln in loss_names:
        if ln:
            handles.append(Line2D([], [], color=loss_color[ln], linewidth=2, label=f"loss: {ln}"))
    if handles:
        ax.legend(
            handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.02),
            ncol=min(len(handles), 4), fontsize=9, frameon=False, handlelength=2.2,
        )  # fmt: skip

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=dpi, facecolor="white", bbox_inches="tight",
                pad_inches=0.25)  # fmt: skip
    return path


def plot_curves(
    history: dict[str, list[tuple[int, float]]],
    path: str | os.PathLike,
    ylabel: str = "top-1 accuracy (%)",
    title: str | None = None,
) -> Path:
    """Line chart of ``history`` (node -> [(epoch, value), ...]), one line per node, saved as
    a PNG at ``path`` (parent folders created); returns the path. Points are sorted by epoch;
    non-finite values are left out; each line's best value is marked."""
    path = Path(path)
    fig = Figure(figsize=(8, 5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    drawn = 0
    for i, (node, points) in enumerate(history.items()):
        pts = sorted(
            (int(e), float(v)) for e, v in points if v is not None and math.isfinite(float(v))
        )
        if not pts:
            continue
        xs, ys = zip(*pts)
        color = _EDGE_COLORS[i % len(_EDGE_COLORS)]
        ax.plot(xs, ys, label=node, color=color, linewidth=1.8,
                marker="o" if len(pts) <= 30 else None, markersize=3.5)  # fmt: skip
        j = max(range(len(ys)), key=ys.__getitem__)
        ax.plot([xs[j]], [ys[j]], marker="*", markersize=11, color=color, zorder=5)
        drawn += 1
    if drawn:
        ax.legend(loc="best", fontsize=9)
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=fig.dpi, facecolor="white")
    return path
