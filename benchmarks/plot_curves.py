"""Learning curves of runs as a PNG (OpenCV, no plotting package): one panel per TensorBoard tag, x = samples.
Runs are grouped by --labels (one label per run, same order); each run is one line in its group's colour.

    python benchmarks/plot_curves.py --runs RUN1 RUN2 --labels DMO PPO --tags eval/success_rate eval/mean_final_distance \
        --out results/reach_curves.png
"""

import dataclasses
import os

import cv2
import numpy as np
import tyro
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

COLOURS = [(200, 90, 30), (40, 40, 220), (40, 160, 40), (160, 40, 160), (0, 140, 200)]  # BGR


@dataclasses.dataclass
class Args:
    runs: list[str]
    """run directories (TensorBoard event files inside)"""
    labels: list[str]
    """a label per run; runs with the same label share a colour"""
    tags: list[str] = dataclasses.field(default_factory=lambda: ["eval/success_rate", "eval/mean_final_distance"])
    """scalars to draw, one panel each"""
    out: str = "curves.png"
    """the PNG to write"""
    hlines: list[str] = dataclasses.field(default_factory=list)
    """reference lines "TAG=VALUE=NAME" (e.g. eval/mean_final_distance=175=random)"""
    xlabel: str = "samples"
    """the x-axis's name (the runs' TensorBoard step: world-model samples for the RL scripts, gradient steps for ACT)"""


def scalars(run, tag):
    ea = EventAccumulator(run, size_guidance={"scalars": 0})
    ea.Reload()
    if tag not in ea.Tags()["scalars"]:
        return np.zeros(0), np.zeros(0)
    events = ea.Scalars(tag)
    return np.array([e.step for e in events], float), np.array([e.value for e in events], float)


def panel(series, tag, hlines, xlabel="samples", w=520, h=360, m=60):
    img = np.full((h, w, 3), 255, np.uint8)
    xs = np.concatenate([s[0] for s in series if len(s[0])] or [np.zeros(1)])
    ys = np.concatenate([s[1] for s in series if len(s[1])] + [np.array([v for _, v, _ in hlines])] or [np.zeros(1)])
    x0, x1 = 0.0, max(xs.max(), 1.0)
    y0, y1 = min(0.0, ys.min()), max(ys.max(), 1e-6) * 1.05
    px = lambda x: int(m + (x - x0) / (x1 - x0) * (w - 1.5 * m))
    py = lambda y: int(h - m - (y - y0) / (y1 - y0) * (h - 1.7 * m))
    cv2.rectangle(img, (m, int(0.7 * m)), (w - m // 2, h - m), (0, 0, 0), 1)
    for frac in (0, 0.5, 1):
        cv2.putText(img, f"{x0 + frac * (x1 - x0):,.0f}", (px(x0 + frac * (x1 - x0)) - 20, h - m + 18),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
        cv2.putText(img, f"{y0 + frac * (y1 - y0):.3g}", (5, py(y0 + frac * (y1 - y0)) + 4),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(img, tag, (m, int(0.5 * m)), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(img, xlabel, (w // 2 - 30, h - 15), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    for _, v, name in hlines:
        cv2.line(img, (px(x0), py(v)), (px(x1), py(v)), (150, 150, 150), 1, cv2.LINE_AA)
        cv2.putText(img, name, (px(x1) - 60, py(v) - 4), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (120, 120, 120), 1, cv2.LINE_AA)
    for (x, y, colour) in series:
        if len(x):
            pts = np.stack([[px(a), py(b)] for a, b in zip(x, y)]).astype(np.int32)
            cv2.polylines(img, [pts], False, colour, 2, cv2.LINE_AA)
    return img


def main(a):
    if len(a.labels) != len(a.runs):
        raise SystemExit("error: give one --labels entry per --runs entry")
    names = list(dict.fromkeys(a.labels))
    hlines = [(t, float(v), n) for t, v, n in (s.split("=", 2) for s in a.hlines)]
    panels = []
    for tag in a.tags:
        series = [(*scalars(run, tag), COLOURS[names.index(label) % len(COLOURS)]) for run, label in zip(a.runs, a.labels)]
        panels.append(panel(series, tag, [h for h in hlines if h[0] == tag], a.xlabel))
    img = np.concatenate(panels, 1)
    legend = np.full((30, img.shape[1], 3), 255, np.uint8)
    x = 20
    for i, name in enumerate(names):
        cv2.line(legend, (x, 15), (x + 30, 15), COLOURS[i % len(COLOURS)], 3)
        cv2.putText(legend, name, (x + 36, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
        x += 36 + cv2.getTextSize(name, cv2.FONT_HERSHEY_SIMPLEX, 0.45, 1)[0][0] + 24
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    cv2.imwrite(a.out, np.concatenate([legend, img], 0))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main(tyro.cli(Args))
