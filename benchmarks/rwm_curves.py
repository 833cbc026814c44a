"""MBPO-PPO against model-free PPO on rwm_mbpo_ppo.py's task, over seeds: curves with a band, a table, sample
efficiency. Reads each run's eval_history.jsonl (the deterministic policy in the simulator every `eval_every`
iterations, on the same start states) and eval.json (the final evaluation on other start states).

    python benchmarks/rwm_curves.py --runs runs/A runs/B runs/C runs/D --labels MBPO-PPO MBPO-PPO PPO PPO \
        --hlines 0.890=standing 1.074=random --out results/rwm_curves.png

Prints, per label: the final evaluation (mean ± std over seeds of the tracking error, return, falls, wall-clock),
and the real samples each seed needs before its tracking-error curve first reaches each label's final mean error
(`--target` adds another level). Samples to reach a level: the first evaluation at or below it (a curve that never
reaches it counts as "-"). Draws two panels (tracking error, return) against real samples on a log axis: the mean
over seeds (curves interpolated onto a common grid) and a band from the lowest to the highest seed.
"""

import dataclasses
import json
import os

import cv2
import numpy as np
import tyro

COLOURS = [(200, 90, 30), (40, 40, 220), (40, 160, 40), (160, 40, 160)]  # BGR


@dataclasses.dataclass
class Args:
    runs: list[str]
    """run directories (eval_history.jsonl and eval.json inside)"""
    labels: list[str]
    """a label per run; runs with the same label are seeds of one method"""
    out: str = "rwm_curves.png"
    """the PNG to write"""
    hlines: list[str] = dataclasses.field(default_factory=list)
    """reference tracking errors "VALUE=NAME" (e.g. 0.890=standing)"""
    target: list[float] = dataclasses.field(default_factory=list)
    """more tracking-error levels to count samples to"""


def history(run):
    rows = [json.loads(line) for line in open(os.path.join(run, "eval_history.jsonl"))]
    x = np.array([r["global_step"] for r in rows], float)
    return x, np.array([r["mean_tracking_error"] for r in rows]), np.array([r["mean_return"] for r in rows])


def samples_to(x, y, level):
    hit = np.flatnonzero(y <= level)
    return int(x[hit[0]]) if len(hit) else None


def band(curves, grid):
    """Each seed's curve, on the grid (log-x interpolation, NaN outside its own range): mean, low, high."""
    ys = []
    for x, y in curves:
        yi = np.interp(np.log(grid), np.log(np.maximum(x, 1)), y)
        yi[(grid < x[0]) | (grid > x[-1])] = np.nan
        ys.append(yi)
    ys = np.array(ys)
    ok = ~np.isnan(ys).any(0)
    return grid[ok], ys[:, ok].mean(0), ys[:, ok].min(0), ys[:, ok].max(0)


def panel(groups, key, title, hlines, w=560, h=380, m=64):
    img = np.full((h, w, 3), 255, np.uint8)
    xs = np.concatenate([x for g in groups.values() for x in g["x"]])
    ys = np.concatenate([c for g in groups.values() for c in g[key]] + [np.array([v for v, _ in hlines])])
    lo_x, hi_x = np.log10(max(xs[xs > 0].min(), 1)), np.log10(xs.max())
    lo_y, hi_y = ys.min(), ys.max()
    pad = 0.05 * (hi_y - lo_y + 1e-9)
    lo_y, hi_y = lo_y - pad, hi_y + pad

    def px(x, y):
        u = m + (np.log10(np.maximum(x, 1)) - lo_x) / (hi_x - lo_x + 1e-9) * (w - 1.5 * m)
        v = h - m - (y - lo_y) / (hi_y - lo_y) * (h - 1.6 * m)
        return np.stack([u, v], -1).astype(np.int32)

    cv2.rectangle(img, (m, int(0.6 * m)), (w - m // 2, h - m), (0, 0, 0), 1)
    for e in range(int(np.ceil(lo_x)), int(np.floor(hi_x)) + 1):
        u = px(np.array([10.0**e]), np.array([lo_y]))[0][0]
        cv2.line(img, (u, h - m), (u, h - m + 5), (0, 0, 0), 1)
        cv2.putText(img, f"1e{e}", (u - 14, h - m + 20), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1)
    for t in np.linspace(lo_y, hi_y, 5):
        v = px(np.array([10.0**lo_x]), np.array([t]))[0][1]
        cv2.putText(img, f"{t:.2f}", (4, v + 4), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1)
    for value, name in hlines:
        pts = px(np.array([10.0**lo_x, 10.0**hi_x]), np.array([value, value]))
        cv2.line(img, tuple(pts[0]), tuple(pts[1]), (120, 120, 120), 1, cv2.LINE_AA)
        cv2.putText(img, name, (pts[1][0] - 70, pts[1][1] - 4), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (90, 90, 90), 1)
    for i, (label, g) in enumerate(groups.items()):
        colour = COLOURS[i % len(COLOURS)]
        grid = np.geomspace(max(min(x[0] for x in g["x"]), 1), max(x[-1] for x in g["x"]), 200)
        gx, mean, low, high = band(list(zip(g["x"], g[key])), grid)
        if len(gx) > 1:
            poly = np.concatenate([px(gx, low), px(gx, high)[::-1]])
            overlay = img.copy()
            cv2.fillPoly(overlay, [poly], tuple(int(0.35 * c + 0.65 * 255) for c in colour))
            img = cv2.addWeighted(overlay, 0.7, img, 0.3, 0)
            cv2.polylines(img, [px(gx, mean)], False, colour, 2, cv2.LINE_AA)
        cv2.putText(img, f"{label} ({len(g['x'])} seeds)", (m + 8, int(0.6 * m) + 18 + 16 * i),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.45, colour, 1, cv2.LINE_AA)
    cv2.putText(img, title, (m, int(0.6 * m) - 8), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(img, "real samples", (w // 2 - 40, h - 12), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1)
    return img


def main(a):
    if len(a.runs) != len(a.labels):
        raise SystemExit(f"error: {len(a.runs)} runs but {len(a.labels)} labels")
    groups = {}
    for run, label in zip(a.runs, a.labels):
        x, err, ret = history(run)
        x, err, ret = x[x > 0], err[x > 0], ret[x > 0]  # a log axis: PPO's evaluation before any sample is left out
        final = json.load(open(os.path.join(run, "eval.json")))
        g = groups.setdefault(label, dict(x=[], err=[], ret=[], final=[]))
        g["x"].append(x), g["err"].append(err), g["ret"].append(ret), g["final"].append(final)
    print("| method | seeds | real samples | wall-clock (min) | final tracking error | final return | falls | success |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for label, g in groups.items():
        f = {k: np.array([r[k] for r in g["final"]], float) for k in
             ("global_step", "wall_time_s", "mean_tracking_error", "mean_return", "fall_rate", "success_rate")}
        print(f"| {label} | {len(g['final'])} | {f['global_step'].mean():,.0f} | {f['wall_time_s'].mean() / 60:.1f} | "
              f"{f['mean_tracking_error'].mean():.3f} ± {f['mean_tracking_error'].std():.3f} | "
              f"{f['mean_return'].mean():.2f} ± {f['mean_return'].std():.2f} | {f['fall_rate'].mean():.2f} | "
              f"{f['success_rate'].mean():.2f} |")
    levels = sorted({round(float(np.mean([r["mean_tracking_error"] for r in g["final"]])), 3)
                     for g in groups.values()} | set(a.target), reverse=True)
    print("\nReal samples before the tracking-error curve first reaches each level (one entry per seed):\n")
    print("| level | " + " | ".join(groups) + " |")
    print("| --- |" + " --- |" * len(groups))
    for level in levels:
        cells = []
        for g in groups.values():
            hits = [samples_to(x, y, level) for x, y in zip(g["x"], g["err"])]
            cells.append(", ".join("-" if s is None else f"{s:,}" for s in hits))
        print(f"| {level:.3f} | " + " | ".join(cells) + " |")
    hlines = [(float(v), n) for v, n in (s.split("=", 1) for s in a.hlines)]
    img = np.concatenate([panel(groups, "err", "tracking error (eval, lower is better)", hlines),
                          panel(groups, "ret", "return (eval)", [])], 1)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    cv2.imwrite(a.out, img)
    print(f"\nwrote {a.out}")


if __name__ == "__main__":
    main(tyro.cli(Args))
