"""The gate applied to the reward model r itself, before any RSSM learns from it: from 256 play states and random
actions, central differences of r(next frame | s_start = the current frame, s_goal) in the action, through the
simulator, against those of the task's true reward. A low cosine here means r's labels cannot teach the local model
the right action gradient, whatever the RSSM does.

    python benchmarks/reward_gradient_check.py RUN_DIR_OR_REWARD_MODEL.pt ENV_ID PLAY_DATA.npz
"""
import os
import sys

import gymnasium as gym
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dmo_sapo_diamond as dmo  # noqa: E402
import envs  # noqa: E402
torch.set_num_threads(1)
run = sys.argv[1]; env_id = sys.argv[2]; data_path = sys.argv[3]; n = 256; eps = 0.05
r = dmo.load_reward_model(run if run.endswith(".pt") else f"{run}/reward_model.pt")
S = r.img_size
d = np.load(data_path)
states = d["state"]; rng = np.random.default_rng(0)
idx = rng.integers(len(states), size=n)
acts = rng.uniform(-0.8, 0.8, (n, 2))
sim = gym.make(env_id, obs_size=S).unwrapped
goal = torch.as_tensor(envs.goal_image(env_id, S)).permute(2, 0, 1)
with torch.no_grad():
    ge = r.embed(dmo.to_float(goal)[None])
def r_after(s, a, start_e):
    sim.reset(options={"state": s})
    f, true_r = sim.step(a)[:2]
    with torch.no_grad():
        e = r.embed(dmo.to_float(torch.as_tensor(f).permute(2, 0, 1))[None])
        return r.reward(e, start_e, ge).item(), true_r
cos, by_tool = [], []
for i, a in zip(idx, acts):
    s = states[i]
    f0 = sim.reset(options={"state": s})[0]
    with torch.no_grad():
        se = r.embed(dmo.to_float(torch.as_tensor(f0).permute(2, 0, 1))[None])
    gr, gt = np.zeros(2), np.zeros(2)
    for k in range(2):
        e = np.eye(2)[k] * eps
        (rp, tp), (rm, tm) = r_after(s, a + e, se), r_after(s, a - e, se)
        gr[k], gt[k] = (rp - rm) / (2 * eps), (tp - tm) / (2 * eps)
    if np.linalg.norm(gt) < 1e-6 or np.linalg.norm(gr) < 1e-9:
        continue
    c = gr @ gt / np.linalg.norm(gr) / np.linalg.norm(gt)
    cos.append(c)
    # the tool's gap to the puck (radius 40, tool 15), or, on reach, the tool's distance to the target
    gap = max(0.0, np.linalg.norm(s[:2] - s[2:4]) - 55.0) if len(s) >= 4 else np.linalg.norm(s[:2] - 256.0) + 1
    by_tool.append((gap, c))
cos = np.array(cos); gaps = np.array([g for g, _ in by_tool])
print(f"{env_id}: r's finite-difference action gradient vs the true reward's: mean cosine {cos.mean():+.3f}, "
      f"positive at {np.mean(cos > 0):.0%} of {len(cos)} states")
buckets = (("0 (touching)", gaps <= 0), ("0-60", (gaps > 0) & (gaps < 60)),
           ("60-150", (gaps >= 60) & (gaps < 150)), ("150 and more", gaps >= 150))
for name, m in buckets:
    if m.any():
        print(f"  tool gap to the object (reach: to the target) {name} px: {m.sum()} states, "
              f"mean cosine {cos[m].mean():+.3f}")
