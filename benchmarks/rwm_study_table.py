"""The prediction study (rwm_mbpo_ppo.py --mode prediction-study) over seeds: a table of mean ± std and a picture
of each model's error against the forecast step (Fig. 6), with a band from the lowest to the highest seed.

    python benchmarks/rwm_study_table.py --runs runs/STUDY1 runs/STUDY2 runs/STUDY3 --out results/rwm_study.png

Each run's prediction_study.json holds, per model, the relative autoregressive error at every forecast step
without noise and its mean over the steps at each noise level.
"""

import dataclasses
import json
import os

import sys

import cv2
import numpy as np
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from rwm_mbpo_ppo import FORECAST_COLOURS as COLOURS  # noqa: E402  (the models' colours of forecasts.png)


@dataclasses.dataclass
class Args:
    runs: list[str]
    """prediction-study run directories (one per seed)"""
    out: str = "rwm_study.png"
    """the PNG to write"""


def main(a):
    studies = [json.load(open(os.path.join(run, "prediction_study.json"))) for run in a.runs]
    models = list(studies[0]["models"])
    noise = sorted(float(k.split("_")[1]) for k in studies[0]["models"][models[0]] if k.startswith("sigma_"))
    N = studies[0]["forecast_horizon"]
    print(f"{len(studies)} seeds; relative autoregressive error, mean ± std over seeds; H = {studies[0]['eval_horizon']}"
          f" forecast steps\n")
    print("| model | step 1 | step N | step H | mean | " + " | ".join(f"σ={s}" for s in noise[1:]) + " |")
    print("|" + " --- |" * (5 + len(noise) - 1))
    curves = {}
    for name in models:
        per_step = np.array([s["models"][name]["sigma_0.0"]["per_step"] for s in studies])  # (seeds, H)
        curves[name] = per_step
        cells = [per_step[:, 0], per_step[:, min(N, per_step.shape[1]) - 1], per_step[:, -1], per_step.mean(1)]
        cells += [np.array([s["models"][name][f"sigma_{sigma}"]["mean"] for s in studies]) for sigma in noise[1:]]
        print(f"| {name} | " + " | ".join(f"{c.mean():.3f} ± {c.std():.3f}" for c in cells) + " |")
    w, h, m = 640, 400, 60
    img = np.full((h, w, 3), 255, np.uint8)
    H = next(iter(curves.values())).shape[1]
    top = max(c.max() for c in curves.values()) * 1.05

    def px(k, e):
        return np.stack([m + (k - 1) / (H - 1) * (w - 1.5 * m), h - m - e / top * (h - 1.6 * m)], -1).astype(np.int32)

    steps = np.arange(1, H + 1)
    for name, c in curves.items():
        colour = COLOURS.get(name, (0, 0, 0))
        overlay = img.copy()
        poly = np.concatenate([px(steps, c.min(0)), px(steps, c.max(0))[::-1]])
        cv2.fillPoly(overlay, [poly], tuple(int(0.35 * v + 0.65 * 255) for v in colour))
        img = cv2.addWeighted(overlay, 0.6, img, 0.4, 0)
    for i, (name, c) in enumerate(curves.items()):
        colour = COLOURS.get(name, (0, 0, 0))
        cv2.polylines(img, [px(steps, c.mean(0))], False, colour, 2, cv2.LINE_AA)
        cv2.putText(img, name, (m + 10, int(0.6 * m) + 18 + 17 * i), cv2.FONT_HERSHEY_SIMPLEX, 0.5, colour, 1,
                    cv2.LINE_AA)
    cv2.rectangle(img, (m, int(0.6 * m)), (w - m // 2, h - m), (0, 0, 0), 1)
    for t in np.linspace(0, top, 5):
        v = px(np.array([1]), np.array([t]))[0][1]
        cv2.putText(img, f"{t:.2f}", (8, v + 4), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1)
    for k in (1, H // 4, H // 2, 3 * H // 4, H):
        u = px(np.array([k]), np.array([0.0]))[0][0]
        cv2.putText(img, str(k), (u - 6, h - m + 18), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1)
    cv2.putText(img, "forecast step", (w // 2 - 50, h - 14), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1)
    cv2.putText(img, f"relative error, mean and range over {len(studies)} seeds", (m, int(0.6 * m) - 8),
                cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    cv2.imwrite(a.out, img)
    print(f"\nwrote {a.out}")


if __name__ == "__main__":
    main(tyro.cli(Args))
