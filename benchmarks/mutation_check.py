"""Mutation check of the test suite: do the tests notice a bug in the core math?

Each mutation is one deliberate bug, an exact source-string replacement (its original must occur exactly once).
It is applied to a temporary copy of the repository (the top-level .py files and tests/), and the tests that
should notice it run there (`pytest -x -q` on a small selection). A mutation the tests pass with has survived.
The selections first run unmutated (one pytest run per test file, its selections joined with `or`): they must
pass there, or "caught" would mean nothing. The table names the first test that failed under each mutation.

    python benchmarks/mutation_check.py               # every mutation, a few minutes on one CPU core
    python benchmarks/mutation_check.py -k temperature  # those whose name contains a word
    python benchmarks/mutation_check.py --list

Prints a table (mutation, where, caught/survived, the failing test, seconds); exits 1 if any mutation survived
(or a selection fails without one). Each pytest run is a fresh process (imports dominate: about 3 s of CPU).
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DMO, RWM = "dmo_sapo_diamond.py", "rwm_mbpo_ppo.py"
DMO_MATH, RWM_MATH = "tests/test_dmo_math.py", "tests/test_rwm_math.py"


def m(name, file, where, old, new, *tests):
    return dict(name=name, file=file, where=where, old=old, new=new, tests=list(tests))


def baseline_selections(mutations):
    """One pytest selection per test file: the union of the mutations' selections of that file."""
    by_file = {}
    for mu in mutations:
        path, k = mu["tests"][0], mu["tests"][mu["tests"].index("-k") + 1] if "-k" in mu["tests"] else None
        by_file.setdefault(path, set()).add(k)
    return [[path] if None in ks else [path, "-k", " or ".join(f"({k})" for k in sorted(ks))]
            for path, ks in sorted(by_file.items())]


MUTATIONS = [
    # the ten that went unnoticed before tests/test_dmo_math.py and tests/test_rwm_math.py (issue 25)
    m("RSSM pretraining sequences' actions not shifted", DMO, "rssm_sequences",
      'actions = torch.cat([torch.zeros_like(data["action"][idx[:, :1]]), data["action"][idx[:, :-1]]], 1)',
      'actions = data["action"][idx]',
      DMO_MATH, "-k", "pretraining_sequences"),
    m("evaluation feeds a zero action into obs_step", DMO, "run_episodes",
      "state, _ = rssm.obs_step(state, action, rssm.encode(",
      "state, _ = rssm.obs_step(state, torch.zeros_like(action), rssm.encode(",
      DMO_MATH, "-k", "evaluation_feeds"),
    m("temperature loss's sign flipped", DMO, "dmo_sapo",
      "(entropy - args.target_entropy)  # SAPO's temperature",
      "(args.target_entropy - entropy)  # SAPO's temperature",
      DMO_MATH, "-k", "temperature"),
    m("entropy bonus's sign flipped in the actor objective", DMO, "imagine_horizon",
      "entropy_term = entropy_term + args.gamma**h * bonus",
      "entropy_term = entropy_term - args.gamma**h * bonus",
      DMO_MATH, "-k", "sapo_objective or sapo_gradient"),
    m("reward without R_phi's gradient (reward = r)", DMO, "imagine_horizon",
      "reward = r_hat + (r - r_hat).detach()",
      "reward = r",
      DMO_MATH, "-k", "sapo_objective or sapo_gradient"),
    m("critic targets one step off", DMO, "dmo_sapo",
      'next_values = critic.value(torch.cat([feats[1:], traj["last_feat"][None]]))',
      "next_values = critic.value(feats)",
      DMO_MATH, "-k", "critic_targets"),
    m("EDM training target /c_out written as *c_out", DMO, "Denoiser.loss",
      "F.mse_loss(out, (target - c_skip * noisy) / c_out)",
      "F.mse_loss(out, (target - c_skip * noisy) * c_out)",
      DMO_MATH, "-k", "edm_training_target"),
    m("Euler sampler step's sign flipped", DMO, "Denoiser.sample",
      "x = x + (x - denoised) / sigma * (next_sigma - sigma)",
      "x = x - (x - denoised) / sigma * (next_sigma - sigma)",
      DMO_MATH, "-k", "euler"),
    m("RWM rollout GAE ignores episode ends", RWM, "rollout",
      'nonterminal = 1.0 - buf["dones"][t]',
      "nonterminal = 1.0",
      RWM_MATH, "-k", "gae"),
    m("RWM rollout treats time-outs as terminal (no bootstrap)", RWM, "rollout",
      "reward = reward + gamma * time_out * agent.get_value(final_obs).to(reward.device)",
      "reward = reward",
      RWM_MATH, "-k", "time_outs"),
    m("RWM rollout bootstraps time-outs with the next episode's first state", RWM, "rollout",
      "reward = reward + gamma * time_out * agent.get_value(final_obs).to(reward.device)",
      "reward = reward + gamma * time_out * agent.get_value(env.policy_obs()).to(reward.device)",
      RWM_MATH, "-k", "time_outs"),
    m("RWM imagination thresholds its contact and termination heads at 0.5", RWM, "Imagination.step",
      "contacts, done = torch.sigmoid(con[:, 0]), torch.rand_like(term[:, 0]) < torch.sigmoid(term[:, 0])",
      "contacts, done = (torch.sigmoid(con[:, 0]) > 0.5).float(), torch.sigmoid(term[:, 0]) > 0.5",
      "tests/test_rwm.py", "-k", "probabilities"),
    m("RWM normaliser drops the between-batch variance term", RWM, "Normalizer.update",
      "var * n + delta**2 * self.count * n / total) / total",
      "var * n) / total",
      RWM_MATH, "-k", "normalizer"),
    # more of the same kind
    m("temperature loss's sign flipped (the older test alone)", DMO, "dmo_sapo",
      "(entropy - args.target_entropy)  # SAPO's temperature",
      "(args.target_entropy - entropy)  # SAPO's temperature",
      "tests/test_dmo_sapo_diamond.py", "-k", "temperature_follows_it"),
    m("actor loss not divided by H", DMO, "dmo_sapo",
      "actor_loss = -sum(terms).mean() / H",
      "actor_loss = -sum(terms).mean()",
      DMO_MATH, "-k", "actor_loss"),
    m("bootstrap discounted by gamma^(H-1)", DMO, "imagine_horizon",
      "bootstrap_term = args.gamma**H * critic.value(last_feat)",
      "bootstrap_term = args.gamma**(H - 1) * critic.value(last_feat)",
      DMO_MATH, "-k", "sapo_objective"),
    m("twin critics: maximum instead of minimum", DMO, "Critic.value",
      "return self(feat).min(0).values",
      "return self(feat).max(0).values",
      DMO_MATH, "-k", "sapo_objective or critic_targets"),
    m("critic targets without the entropy bonus", DMO, "dmo_sapo",
      'targets = lambda_returns(traj["soft_rewards"], next_values',
      'targets = lambda_returns(traj["rewards"], next_values',
      DMO_MATH, "-k", "critic_targets"),
    m("soft rewards subtract the bonus", DMO, "imagine_horizon",
      "soft_rewards.append((r + bonus).detach())",
      "soft_rewards.append((r - bonus).detach())",
      DMO_MATH, "-k", "imagined_trajectory"),
    m("DMO step given the detached action (no gradient to the actor)", DMO, "imagine_horizon",
      "next_state = rssm.decoupled_step(state, action, embed)",
      "next_state = rssm.decoupled_step(state, action.detach(), embed)",
      DMO_MATH, "-k", "sapo_gradient"),
    m("replay chunk stores the action before the frame it led into", DMO, "imagine_horizon",
      "for buf, x in zip(chunk, (store(next_obs), action.detach(), r)):",
      "for buf, x in zip(chunk, (store(next_obs), torch.zeros_like(action), r)):",
      DMO_MATH, "-k", "imagined_trajectory"),
    m("imagination starts filtered without shifting the actions", DMO, "play_context",
      "local_obs(data, idx))), into, is_first, sample=sample)",
      "local_obs(data, idx))), actions, is_first, sample=sample)",
      DMO_MATH, "-k", "imagination_starts"),
    m("DIAMOND conditioned on the new action first", DMO, "Rollouts.forward",
      "past_actions = torch.cat([self.actions, action[:, None]], 1)",
      "past_actions = torch.cat([action[:, None], self.actions], 1)",
      DMO_MATH, "-k", "diamond_rollouts"),
    m("EDM denoiser output with c_skip and c_out swapped", DMO, "Denoiser.denoise",
      "quantize(c_skip * noisy + c_out * self.model_output(",
      "quantize(c_out * noisy + c_skip * self.model_output(",
      DMO_MATH, "-k", "c_skip_x_plus"),
    m("PPO learning rate falls when the KL is small", RWM, "ppo_update",
      "if kl > 2 * args.desired_kl:",
      "if kl < 2 * args.desired_kl:",
      RWM_MATH, "-k", "learning_rate_follows"),
    m("PPO's KL without the log-std ratio", RWM, "ppo_update",
      "kl = (torch.log(std / std_old) + ",
      "kl = (",
      RWM_MATH, "-k", "learning_rate_follows"),
    m("RWM replay windows may span two episodes", RWM, "ReplayBuffer.sample",
      "ok = self.episode[e, s % self.size] == self.episode[e, (s + length - 1) % self.size]",
      "ok = np.ones(len(e), bool)",
      RWM_MATH, "-k", "replay_windows"),
]


def copy_repo(dst):
    for name in os.listdir(ROOT):
        if name.endswith(".py"):
            shutil.copy2(os.path.join(ROOT, name), dst)
    shutil.copytree(os.path.join(ROOT, "tests"), os.path.join(dst, "tests"),
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


def run_tests(repo, tests, timeout):
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)
        out = proc.stdout + proc.stderr
        passed, tail = proc.returncode == 0, out[-1500:]
        if proc.returncode == 5:  # no test collected: the selection is wrong, not the code
            raise SystemExit(f"error: no test matches {' '.join(tests)}")
        failed = [line.split()[1].split("::")[-1] for line in out.splitlines()
                  if line.startswith(("FAILED ", "ERROR "))]
        by = failed[0] if failed else ("" if passed else f"exit code {proc.returncode}")
    except subprocess.TimeoutExpired:
        passed, tail, by = False, f"timed out after {timeout} s", "timeout"
    return passed, time.time() - t0, tail, by


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-k", default="", help="only the mutations whose name contains this (case-insensitive)")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per pytest run")
    opts = parser.parse_args()
    mutations = [mu for mu in MUTATIONS if opts.k.lower() in mu["name"].lower()]
    sources = {}
    for mu in mutations:  # every original string occurs exactly once, checked before anything runs
        text = sources.setdefault(mu["file"], open(os.path.join(ROOT, mu["file"])).read())
        count = text.count(mu["old"])
        assert count == 1, f"{mu['name']}: the original string occurs {count} times in {mu['file']}: {mu['old']!r}"
    if opts.list:
        for mu in mutations:
            print(f"{mu['name']} ({mu['file']}: {mu['where']}): pytest {' '.join(mu['tests'])}")
        return 0
    t_start = time.time()
    with tempfile.TemporaryDirectory(prefix="mutation_check_") as tmp:
        repo = os.path.join(tmp, "repo")
        os.makedirs(repo)
        copy_repo(repo)
        baseline_failed = []
        for tests in baseline_selections(mutations):
            passed, seconds, tail, _ = run_tests(repo, tests, opts.timeout)
            verdict = "passes" if passed else "FAILS"
            print(f"unmutated: pytest {' '.join(tests)}: {verdict} ({seconds:.0f} s)", flush=True)
            if not passed:
                baseline_failed.append(tests)
                print(tail)
        if baseline_failed:
            print("error: selections fail without any mutation; fix them first")
            return 1
        rows = []
        for mu in mutations:
            path = os.path.join(repo, mu["file"])
            original = sources[mu["file"]]
            with open(path, "w") as f:
                f.write(original.replace(mu["old"], mu["new"]))
            try:
                passed, seconds, _, by = run_tests(repo, mu["tests"], opts.timeout)
            finally:
                with open(path, "w") as f:
                    f.write(original)
            rows.append((mu, "survived" if passed else "caught", by, seconds))
            print(f"{rows[-1][1]:>8}  {seconds:5.1f} s  {mu['name']}", flush=True)
    print()
    print("| mutation | where | result | by | seconds |")
    print("| --- | --- | --- | --- | --- |")
    for mu, result, by, seconds in rows:
        print(f"| {mu['name']} | `{mu['where']}` ({mu['file']}) | {result} | {by} | {seconds:.1f} |")
    survived = sum(result == "survived" for _, result, _, _ in rows)
    print(f"\n{len(rows) - survived} of {len(rows)} mutations caught, {survived} survived "
          f"({time.time() - t_start:.0f} s in all)")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
