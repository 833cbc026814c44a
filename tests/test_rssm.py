"""Numerics of rssm.py: shapes, categoricals, two-hot, KL balancing, the DMO step, and learning a toy video."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from rssm import RSSM, RSSMConfig, categorical, keypoint_convs, presets, spatial_softmax, symexp, symlog, twohot, twohot_mean  # noqa: E402

torch.set_num_threads(1)
B, T, A = 3, 5, 2


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


def make(obs_shape=(3, 64, 64)):
    return RSSM(RSSMConfig.preset("tiny", obs_shape=obs_shape, action_dim=A))


def rand_state(m):
    logits, stoch = categorical(torch.randn(B, m.cfg.stoch, m.cfg.classes) * 3, m.cfg.unimix)
    return dict(deter=torch.randn(B, m.cfg.deter).tanh(), stoch=stoch.detach(), logits=logits)


@pytest.mark.parametrize("obs_shape", [(3, 64, 64), (7,)])
def test_shapes(obs_shape):
    m = make(obs_shape)
    S, K, D = m.cfg.stoch, m.cfg.classes, m.cfg.deter
    obs = torch.rand(B, T, *obs_shape) - 0.5
    actions, is_first = torch.rand(B, T, A) * 2 - 1, torch.zeros(B, T, dtype=torch.bool)
    is_first[:, 0] = True
    embeds = m.encode(obs)
    assert embeds.shape == (B, T, m.embed_dim)
    post, prior = m.observe(embeds, actions, is_first)
    for s in (post, prior):
        assert s["deter"].shape == (B, T, D) and s["stoch"].shape == s["logits"].shape == (B, T, S, K)
    feat = m.feat(post)
    assert feat.shape == (B, T, D + S * K) == (B, T, m.feat_dim)
    assert m.decode(feat).shape == obs.shape
    assert m.reward(feat).shape == m.cont(feat).shape == (B, T)
    states, acts = m.imagine(m.initial(B), torch.nn.Linear(m.feat_dim, A), horizon=4)
    assert states["deter"].shape == (B, 5, D) and states["stoch"].shape == (B, 5, S, K) and acts.shape == (B, 4, A)
    loss, parts = m.loss(post, prior, obs, torch.randn(B, T), torch.ones(B, T))
    assert loss.dim() == 0 and set(parts) == {"loss", "recon", "reward", "cont", "dyn", "rep", "kl"}
    loss.backward()
    assert all(p.grad is not None for p in m.parameters()), "every parameter is trained"


def test_paper_presets():
    assert presets["push_t"] == dict(deter=1024, stoch=32, classes=32, units=640, cnn_mult=48, mlp_layers=3)
    assert presets["push_cube"] == dict(deter=4096, stoch=32, classes=32, units=1024, cnn_mult=96, mlp_layers=5)
    m = RSSM(RSSMConfig.preset("push_t"))
    assert m.embed_dim == 8 * 48 * 4 * 4 and m.feat_dim == 1024 + 32 * 32
    assert m.decoder.net[-1].out_channels == 3 and m.encoder.net[0].out_channels == 48


def test_is_first_resets_state_and_action():
    m = make()
    state, embed = rand_state(m), torch.randn(B, m.embed_dim)
    is_first = torch.tensor([True, False, True])
    action = torch.randn(B, A)
    post, prior = m.obs_step(state, action, embed, is_first, sample=False)
    for b in range(B):
        s = m.initial(1) if is_first[b] else {k: v[b : b + 1] for k, v in state.items()}
        a = torch.zeros(1, A) if is_first[b] else action[b : b + 1]
        ref = m.img_step(s, a, sample=False)
        for k in prior:
            torch.testing.assert_close(prior[k][b : b + 1], ref[k])
    torch.testing.assert_close(post["deter"], prior["deter"])


def test_unimix_floor():
    K = 32
    logits, stoch = categorical(torch.randn(64, 32, K) * 50, unimix=0.01)
    assert logits.exp().min() >= 0.01 / K * (1 - 1e-4)
    torch.testing.assert_close(logits.exp().sum(-1), torch.ones(64, 32))
    m = make()
    prior = m.img_step(rand_state(m), torch.randn(B, A))
    assert prior["logits"].exp().min() >= 0.01 / m.cfg.classes * (1 - 1e-4)


def test_straight_through_reaches_logits():
    raw = torch.randn(16, 32, 32, requires_grad=True)
    _, stoch = categorical(raw, unimix=0.01, sample=True)
    assert ((stoch == 0) | (stoch == 1)).all() and (stoch.sum(-1) == 1).all(), "the value is a one-hot sample"
    w = torch.randn_like(stoch)
    (stoch * w).sum().backward()
    probs = 0.99 * raw.softmax(-1) + 0.01 / 32
    (ref,) = torch.autograd.grad((probs * w).sum(), raw)
    assert raw.grad.abs().sum() > 0
    torch.testing.assert_close(raw.grad, ref)  # the gradient of the probabilities
    _, mode = categorical(raw.detach(), sample=False)
    assert (mode.argmax(-1) == raw.argmax(-1)).all()


def test_twohot_and_symlog():
    bins = torch.linspace(-10, 10, 101)
    x = torch.cat([torch.rand(1000) * 20 - 10, bins, torch.tensor([-10.0, 10.0, 0.0, 3.14159])])
    enc = twohot(x, bins)
    torch.testing.assert_close(enc.sum(-1), torch.ones_like(x))
    assert ((enc > 0).sum(-1) <= 2).all() and (enc >= 0).all()
    torch.testing.assert_close(twohot_mean(enc, bins), x, atol=1e-5, rtol=0)
    torch.testing.assert_close(twohot_mean(twohot(torch.tensor([-50.0, 50.0]), bins), bins), torch.tensor([-10.0, 10.0]))
    y = torch.cat([torch.linspace(-1e4, 1e4, 2001), torch.linspace(-2, 2, 101)]).double()
    torch.testing.assert_close(symexp(symlog(y)), y)
    torch.testing.assert_close(symlog(torch.tensor([0.0, 1.0, -1.0])), torch.tensor([0.0, 0.6931472, -0.6931472]))


def test_kl_matches_torch_distributions():
    m = make()
    p_logits, _ = categorical(torch.randn(B, 8, 8) * 2)
    q_logits, _ = categorical(torch.randn(B, 8, 8) * 2)
    ref = torch.distributions.kl_divergence(
        torch.distributions.Categorical(logits=p_logits), torch.distributions.Categorical(logits=q_logits)
    ).sum(-1)
    dyn, rep, kl = m.kl_loss(p_logits, q_logits)
    torch.testing.assert_close(kl, ref.mean())
    torch.testing.assert_close(dyn, ref.clamp(min=1.0).mean())


def test_free_nats_clip():
    m = make()
    post = torch.randn(B, 8, 8, requires_grad=True)
    prior = (post.detach() + 0.05 * torch.randn(B, 8, 8)).requires_grad_()
    dyn, rep, kl = m.kl_loss(*(categorical(x)[0] for x in (post, prior)))
    assert 0 < kl < 1.0 and dyn.item() == rep.item() == 1.0, "below 1 free nat the loss is the constant 1"
    (0.5 * dyn + 0.1 * rep).backward()
    assert post.grad.abs().max() == 0 and prior.grad.abs().max() == 0
    prior = (post.detach() + 3 * torch.randn(B, 8, 8)).requires_grad_()
    dyn, rep, kl = m.kl_loss(categorical(post)[0], categorical(prior)[0])
    assert dyn > 1.0 and rep > 1.0
    dyn.backward()
    assert prior.grad.abs().max() > 0


@pytest.mark.parametrize("sample", [True, False])
def test_decoupled_step_value_is_the_posterior(sample):
    m = make()
    state, action, embed = rand_state(m), torch.randn(B, A), torch.randn(B, m.embed_dim)
    torch.manual_seed(1)
    post, _ = m.obs_step(state, action, embed, torch.zeros(B, dtype=torch.bool), sample=sample)
    torch.manual_seed(1)
    dmo = m.decoupled_step(state, action, embed, sample=sample)
    torch.manual_seed(1)
    prior = m.img_step(state, action, sample=sample)
    assert torch.equal(dmo["deter"], post["deter"]) and torch.equal(dmo["stoch"], post["stoch"])
    torch.testing.assert_close(dmo["logits"], post["logits"])
    assert not torch.equal(dmo["stoch"], prior["stoch"]) and not torch.allclose(dmo["logits"], prior["logits"])


def grads(step, state, action, w):
    state = {k: v.detach().clone().requires_grad_() for k, v in state.items()}
    action = action.detach().clone().requires_grad_()
    out = step(state, action)
    sum((w[k] * out[k]).sum() for k in out).backward()
    return [state["deter"].grad, state["stoch"].grad, state["logits"].grad, action.grad]


def test_decoupled_step_gradient_is_the_prior_transition():
    m = make()
    state, action = rand_state(m), torch.randn(B, A)
    embed = torch.randn(B, m.embed_dim, requires_grad=True)
    w = {k: torch.randn_like(v) for k, v in m.img_step(state, action).items()}
    g_dmo = grads(lambda s, a: m.decoupled_step(s, a, embed), state, action, w)
    g_img = grads(m.img_step, state, action, w)
    for gd, gi in zip(g_dmo[:2] + g_dmo[3:], g_img[:2] + g_img[3:]):
        assert gi.abs().sum() > 0
        torch.testing.assert_close(gd, gi)
    assert g_dmo[2] is None and g_img[2] is None, "logits are an output, not an input, of the transition"
    assert embed.grad is None, "no gradient reaches the encoder"
    m.zero_grad()
    out = m.decoupled_step(state, action, embed)
    sum((w[k] * out[k]).sum() for k in out).backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in m.post_net.parameters())


def test_decoupled_chain_takes_jacobians_at_the_forward_states():
    """Two DMO steps: d L(s2) / d a0 = J_a(img_step at s0, a0)^T J_s(img_step at the *posterior* s1, a1)^T dL."""
    m = make()
    s0, a0, a1 = rand_state(m), torch.randn(B, A, requires_grad=True), torch.randn(B, A)
    e1, e2 = torch.randn(B, m.embed_dim), torch.randn(B, m.embed_dim)
    w = torch.randn(B, m.feat_dim)
    s1 = m.decoupled_step(s0, a0, e1)
    s2 = m.decoupled_step(s1, a1, e2)
    (w * m.feat(s2)).sum().backward()
    # reference, built by hand: the backward model's Jacobian evaluated at s1's (posterior) value
    s1v = {k: v.detach().requires_grad_() for k, v in s1.items()}
    g1 = torch.autograd.grad((w * m.feat(m.img_step(s1v, a1))).sum(), [s1v["deter"], s1v["stoch"]])
    a0r = a0.detach().requires_grad_()
    p1 = m.img_step(s0, a0r)
    (ref,) = torch.autograd.grad([p1["deter"], p1["stoch"]], [a0r], grad_outputs=list(g1))
    torch.testing.assert_close(a0.grad, ref)


def moving_square(n, T, size=64, side=24, gen=None):
    """Frames (n, T, 3, size, size) in [-0.5, 0.5] of a square moved by the actions; reward = its x in [-1, 1]."""
    actions = torch.rand(n, T, 2, generator=gen) * 2 - 1
    pos = torch.zeros(n, T, 2)
    p = torch.rand(n, 2, generator=gen) * (size - side)
    for t in range(T):
        p = (p + 6 * actions[:, t]).clamp(0, size - side)  # actions[:, t] leads into frame t
        pos[:, t] = p
    grid = torch.arange(size)
    lo = pos.round().long()
    in_x = (grid >= lo[..., :1]) & (grid < lo[..., :1] + side)  # (n, T, size)
    in_y = (grid >= lo[..., 1:]) & (grid < lo[..., 1:] + side)
    sq = (in_y[..., :, None] & in_x[..., None, :]).float()  # (n, T, H, W)
    obs = torch.stack([sq, 1 - sq, sq * 0.5], 2) - 0.5
    rewards = pos[..., 0] / (size - side) * 2 - 1
    return obs, actions, rewards


def test_pixel_weight_scales_each_squared_error():
    m = make()
    obs = torch.rand(B, T, 3, 64, 64) - 0.5
    is_first = torch.zeros(B, T, dtype=torch.bool)
    is_first[:, 0] = True
    post, prior = m.observe(m.encode(obs), torch.zeros(B, T, A), is_first)
    args = (post, prior, obs, torch.zeros(B, T), torch.ones(B, T))
    with torch.no_grad():
        err = (m.decode(m.feat(post)) - obs).pow(2)
        _, plain = m.loss(*args)
        _, ones = m.loss(*args, pixel_weight=torch.ones(B, T, 1, 64, 64))
        weight = torch.ones(B, T, 1, 64, 64)
        weight[..., :8, :] = 5.0  # the top 8 rows count 5 times
        _, weighted = m.loss(*args, pixel_weight=weight)
    assert plain["recon"].item() == pytest.approx(err.sum((2, 3, 4)).mean().item(), rel=1e-5)
    assert ones["recon"].item() == pytest.approx(plain["recon"].item(), rel=1e-6)
    expected = (err.sum((2, 3, 4)) + 4 * err[..., :8, :].sum((2, 3, 4))).mean()
    assert weighted["recon"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert weighted["kl"].item() == pytest.approx(plain["kl"].item())  # only the reconstruction changes


def test_learns_moving_square():
    m = RSSM(RSSMConfig.preset("tiny", obs_shape=(3, 64, 64), action_dim=2))
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    obs, actions, rewards = moving_square(64, 8, gen=torch.Generator().manual_seed(0))
    is_first, conts = torch.zeros(64, 8, dtype=torch.bool), torch.ones(64, 8)
    is_first[:, 0] = True
    hist = []
    for _ in range(200):
        i = torch.randint(0, 64, (8,))
        post, prior = m.observe(m.encode(obs[i]), actions[i], is_first[i])
        loss, parts = m.loss(post, prior, obs[i], rewards[i], conts[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
        hist.append(parts)
    first, last = ({k: sum(h[k] for h in hs) / len(hs) for k in hist[0]} for hs in (hist[:10], hist[-10:]))
    mean_frame = (obs - obs.mean((0, 1))).pow(2).sum((-3, -2, -1)).mean()  # loss of predicting the mean frame
    with torch.no_grad():
        post, _ = m.observe(m.encode(obs), actions, is_first)
        r_err = (m.reward(m.feat(post)) - rewards).pow(2).mean()
    assert last["recon"] < 0.2 * first["recon"] and last["recon"] < 0.5 * mean_frame, "learns where the square is"
    assert last["reward"] < 0.5 * first["reward"] and r_err < 0.25 * rewards.var(), "and the reward of its position"


def test_untrained_keypoints_follow_a_small_object():
    """Keypoints must see a 2-pixel tool from step 0: on raw maps they sat at the centre whatever the frame (moved at
    most 0.002 here) and the reach rung's r and RSSM stayed on that plateau for hundreds of steps or for good."""
    torch.manual_seed(0)
    convs = keypoint_convs(3, 8)
    frames = torch.full((2, 3, 32, 32), 0.6)
    frames[0, :, 4:6, 4:6] = torch.tensor([-0.8, -0.6, 0.9])[:, None, None]  # a blue 2x2 tool, top left
    frames[1, :, 26:28, 26:28] = torch.tensor([-0.8, -0.6, 0.9])[:, None, None]  # bottom right
    with torch.no_grad():
        xy = spatial_softmax(convs(frames))
    assert xy.shape == (2, 16)
    moved = xy[1] - xy[0]  # x of each keypoint, then y: both should grow, the object moved right and down
    assert moved.max() > 0.5 and (moved > 0.1).float().mean() > 0.5, moved


def test_spatial_softmax_keypoints_are_the_peaks_coordinates():
    # a map with one sharp peak at column 6, row 2 of 9x5 (x, y in [-1, 1] across the width and the height)
    maps = torch.full((1, 2, 5, 9), -50.0)
    maps[0, 0, 2, 6] = 50.0
    maps[0, 1, 4, 0] = 50.0
    kp = spatial_softmax(maps)
    torch.testing.assert_close(kp, torch.tensor([[6 / 8 * 2 - 1, -1.0, 0.0, 1.0]]), atol=1e-4, rtol=0)
    # appended to the image embedding; the encoder's gradient reaches the keypoint convs
    cfg = RSSMConfig.preset("tiny", obs_shape=(3, 32, 32), action_dim=2, keypoints=4)
    m = RSSM(cfg)
    embed = m.encode(torch.rand(3, 3, 32, 32) - 0.5)
    assert embed.shape == (3, m.embed_dim) and m.embed_dim == 8 * 8 * 2 * 2 + 8
    assert embed[:, -8:].abs().max() <= 1
    embed[:, -8:].sum().backward()
    assert m.encoder.keypoints[0].weight.grad.abs().sum() > 0
