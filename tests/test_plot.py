"""draw_topology / plot_curves produce readable PNGs for the graph shapes we use."""

from __future__ import annotations

import os
import struct
import sys

import pytest

from online_kd.plot import draw_topology, plot_curves

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png_size(path) -> tuple[int, int]:
    data = open(path, "rb").read(32)
    assert data[:8] == PNG_MAGIC
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def check_png(path, min_bytes: int = 10_000, min_wh: tuple[int, int] = (300, 150)) -> None:
    assert os.path.isfile(path)
    assert os.path.getsize(path) > min_bytes
    w, h = png_size(path)
    assert w >= min_wh[0] and h >= min_wh[1]


def peer(name, model, frozen=False):
    return {"name": name, "kind": "peer", "label": model, "frozen": frozen}


def edge(s, t, loss="kl", label=""):
    return {"source": s, "target": t, "loss": loss, "label": label}


GRAPHS = {
    "dml": (
        [peer("a", "resnet18"), peer("b", "mobilenetv2")],
        [edge("a", "b", "kl", "T=1"), edge("b", "a", "kl", "T=1")],
    ),
    "kd_frozen_teacher": (
        [peer("teacher", "resnet50", frozen=True), peer("student", "resnet18")],
        [edge("teacher", "student", "kd", "T=4, w=0.9")],
    ),
    "kdcl": (
        [peer("p1", "resnet18"), peer("p2", "resnet34"), peer("p3", "wrn16_2"),
         {"name": "ens", "kind": "ensemble", "label": "mean(p1,p2,p3)", "frozen": False}],
        [edge("ens", p, "kl", "T=3") for p in ("p1", "p2", "p3")],
    ),  # fmt: skip
    "self_edge_and_virtual": (
        [peer("a", "resnet18"), peer("b", "vgg8"),
         {"name": "vt", "kind": "virtual", "label": "label smoothing", "frozen": False}],
        [edge("a", "a", "self_kd", "past epoch"), edge("vt", "a", "kl"), edge("vt", "b", "kl"),
         edge("a", "b", "kl"), edge("b", "a", "kl"), edge("a", "b", "feature", "hint")],
    ),  # fmt: skip
}


@pytest.mark.parametrize("name", sorted(GRAPHS))
def test_draw_topology(tmp_path, name):
    nodes, edges = GRAPHS[name]
    out = draw_topology(nodes, edges, tmp_path / "sub" / f"{name}.png", title=name)
    assert out == tmp_path / "sub" / f"{name}.png"
    check_png(out)


def test_draw_topology_many_nodes_spring_layout(tmp_path):
    nodes = [peer(f"p{i}", "resnet18", frozen=(i == 0)) for i in range(10)]
    edges = [edge(f"p{i}", f"p{(i + 1) % 10}") for i in range(10)] + [edge("p3", "p3", "self")]
    out = draw_topology(nodes, edges, str(tmp_path / "big.png"))
    check_png(out)
    # deterministic layout (fixed seed) -> identical bytes
    out2 = draw_topology(nodes, edges, tmp_path / "big2.png")
    assert out.read_bytes() == out2.read_bytes()


def test_draw_topology_single_node_and_errors(tmp_path):
    solo = draw_topology([peer("solo", "resnet18")], [], tmp_path / "solo.png")
    check_png(solo, 3_000, (100, 80))
    with pytest.raises(ValueError, match="undeclared"):
        draw_topology([peer("a", "m")], [edge("a", "ghost")], tmp_path / "bad.png")
    with pytest.raises(ValueError, match="duplicate"):
        draw_topology([peer("a", "m"), peer("a", "n")], [], tmp_path / "bad.png")


def test_plot_curves(tmp_path):
    hist = {
        "a": [(e, 10 + 5 * e - 0.2 * e * e) for e in range(12)],
        "b": [(e, 8 + 4 * e) for e in reversed(range(12))],  # unsorted input
        "ens": [(0, float("nan")), (1, 30.0), (2, 35.0)],
    }
    out = plot_curves(hist, tmp_path / "curves" / "top1.png", title="CIFAR-100")
    check_png(out)
    out2 = plot_curves({}, tmp_path / "empty.png", ylabel="loss")
    check_png(out2, 3_000)


def test_no_pyplot_needed():
    # Rendering goes through Figure + Agg canvas; importing the module must not pull in pyplot
    # (checked in a fresh interpreter, since other tests may import pyplot).
    import subprocess

    code = "import sys, online_kd.plot; print('matplotlib.pyplot' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "False"
