"""The view each shipped workflow opens with (`extra.ds`), against the ComfyUI frontend's screen layout.

The frontend (1.47.10) restores `extra.ds` when a workflow file is opened or dropped on the canvas
(`app.loadGraphData`): a node at canvas point p is drawn at (p + offset) * scale CSS pixels from the top left
of the window. Templates opened from the Browse Templates dialog ignore `extra.ds` and are fitted to the window.
"""

from __future__ import annotations

import pytest

from .test_workflows import SHIPPED, load

FRONTEND_MEASURED = "1.47.10"  # comfyui-frontend-package the layout below was measured on (ComfyUI 0.29.0)
# Measured with Playwright + Chromium, default settings, blank workflow, in 1280x720, 1366x768, 1536x864 and
# 1920x1080 windows (the same in all four): document.elementFromPoint() down each column until it returns the
# #graph-canvas element. The workflow tab bar covers y 0-38 across the whole width; below it the "Graph"
# breadcrumb (left, to y 86) and the Run action bar (right, to y 90) float over the canvas.
TOP_BARS_PX = 90
SIDEBAR_PX = 59  # the icon sidebar along the left edge (same measurement, along the middle row)
# Not counted: the minimap and canvas toolbar (a 258x258 px box in the bottom-right corner, which the user can
# close). Keeping the graph clear of it would shrink every view below TEXT_MIN_SCALE at 1280x720.
MARGIN_PX = 24
NODE_TITLE_PX = 30  # LiteGraph.NODE_TITLE_HEIGHT: a node's title bar is drawn above its `pos`
WINDOWS = [(1280, 720), (1920, 1080)]
# Below this scale the canvas draws nodes as plain boxes without text: the frontend's default
# LiteGraph.Canvas.MinFontSizeForLOD (8 px) over LiteGraph.NODE_TEXT_SIZE (14 px), at a device pixel ratio of 1.
TEXT_MIN_SCALE = 8 / 14


def node_boxes(workflow: dict) -> dict[str, tuple[float, float, float, float]]:
    """Each node's box in canvas units, title bar included: (left, top, right, bottom)."""
    return {f"{n['id']} {n['type']}": (n["pos"][0], n["pos"][1] - NODE_TITLE_PX,
                                       n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1])
            for n in workflow["nodes"]}


def free_area(width: int, height: int) -> tuple[int, int, int, int]:
    """The part of a window where the canvas is not covered by the frontend's bars, less the margin."""
    return SIDEBAR_PX + MARGIN_PX, TOP_BARS_PX + MARGIN_PX, width - MARGIN_PX, height - MARGIN_PX


def largest_fitting_scale(workflow: dict, width: int, height: int) -> float:
    boxes = node_boxes(workflow).values()
    graph_w = max(b[2] for b in boxes) - min(b[0] for b in boxes)
    graph_h = max(b[3] for b in boxes) - min(b[1] for b in boxes)
    left, top, right, bottom = free_area(width, height)
    return min((right - left) / graph_w, (bottom - top) / graph_h)


@pytest.mark.parametrize("window", WINDOWS, ids=lambda w: f"{w[0]}x{w[1]}")
@pytest.mark.parametrize("name", SHIPPED)
def test_the_view_shows_every_node_below_the_top_bars(name, window):
    workflow = load(name)
    scale, (dx, dy) = workflow["extra"]["ds"]["scale"], workflow["extra"]["ds"]["offset"]
    left, top, right, bottom = free_area(*window)
    for node, (x0, y0, x1, y1) in node_boxes(workflow).items():
        on_screen = ((x0 + dx) * scale, (y0 + dy) * scale, (x1 + dx) * scale, (y1 + dy) * scale)
        assert (left <= on_screen[0] and top <= on_screen[1] and on_screen[2] <= right
                and on_screen[3] <= bottom), f"{name}: node {node} at {on_screen} is outside {(left, top, right, bottom)}"


@pytest.mark.parametrize("name", SHIPPED)
def test_the_view_is_as_large_as_1280x720_allows(name):
    """Large enough for the nodes' text (every shipped graph is laid out to fit at that scale), and the largest
    scale that fits (to 0.01, the precision the views are saved with)."""
    workflow = load(name)
    fitting = largest_fitting_scale(workflow, *WINDOWS[0])
    assert workflow["extra"]["ds"]["scale"] >= TEXT_MIN_SCALE  # node text drawn
    assert workflow["extra"]["ds"]["scale"] >= fitting - 0.01
