"""The DreamerV3 RSSM: the local backward model of DMO, shared by both DMO scripts.

A recurrent state-space model (Hafner et al., "Mastering diverse control tasks through world models",
Nature 2025) as in ../shared/ALGORITHMS.md §6, plus the decoupled latent step of DMO (ALGORITHMS.md §1;
Amigo et al., "Coupled Local and Global World Models for Efficient First Order RL", §3.4):
`RSSM.decoupled_step`. Sizes: Table 4 of that paper ("Local World Model"), see `presets`.

Conventions: a state is a dict `deter` (B, D), `stoch` (B, S, K) one-hot, `logits` (B, S, K) (log of the
unimixed probabilities). `actions[:, t]` is the action that led *into* frame t (zeroed where `is_first`);
`rewards[:, t]` and `conts[:, t]` (1 - terminal) belong to frame t. Frames are float (..., 3, H, W) with
H, W divisible by 16, e.g. `uint8 / 255 - 0.5`; vector observations are (..., S) and modelled in symlog
space. This file holds modules only: the training loops live in the scripts that import it.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class RSSMConfig:
    obs_shape: tuple = (3, 64, 64)
    """(C, H, W) for frames (CNN encoder/decoder), (S,) for vectors (MLP encoder/decoder)"""
    action_dim: int = 2
    """size of the continuous action"""
    deter: int = 1024
    """recurrent (GRU) state size"""
    stoch: int = 32
    """number of categorical latents"""
    classes: int = 32
    """classes per categorical latent"""
    units: int = 640
    """dense units of every MLP"""
    cnn_mult: int = 48
    """CNN channels = cnn_mult x [1, 2, 4, 8]"""
    keypoints: int = 0
    """spatial-softmax keypoints appended to the CNN embedding (Levine et al. 2016; not DreamerV3: 0): the expected
    image coordinates of `keypoints` feature maps of the full-resolution frame, which hold small objects' positions
    that the strided CNN, trained by reconstruction, does not learn on a CPU budget (README)"""
    mlp_layers: int = 3
    """hidden layers of the encoder/decoder MLPs and of the reward and continuation heads"""
    unimix: float = 0.01
    """uniform mixture of the categoricals"""
    reward_bins: int = 101
    """two-hot bins, evenly spaced in symlog space on [reward_lo, reward_hi]"""
    reward_lo: float = -10.0
    """lowest bin (symlog space)"""
    reward_hi: float = 10.0
    """highest bin (symlog space)"""
    dyn_scale: float = 0.5
    """KL balancing: weight of KL(sg(post) || prior)"""
    rep_scale: float = 0.1
    """KL balancing: weight of KL(post || sg(prior))"""
    free_nats: float = 1.0
    """each summed KL is clipped below at this value"""
    recon_scale: float = 1.0
    """weight of the reconstruction loss"""
    reward_scale: float = 1.0
    """weight of the reward loss"""
    cont_scale: float = 1.0
    """weight of the continuation loss"""

    @classmethod
    def preset(cls, name, **kw):
        return cls(**{**presets[name], **kw})


# Coupled paper Table 4 ("push_t"; "push_cube" = Push Cube & G1 Grab Box) and two CPU sizes
presets = {
    "tiny": dict(deter=64, stoch=8, classes=8, units=64, cnn_mult=8, mlp_layers=1),
    "small": dict(deter=256, stoch=32, classes=32, units=256, cnn_mult=16, mlp_layers=2),
    "push_t": dict(deter=1024, stoch=32, classes=32, units=640, cnn_mult=48, mlp_layers=3),
    "push_cube": dict(deter=4096, stoch=32, classes=32, units=1024, cnn_mult=96, mlp_layers=5),
}


def symlog(x):
    return torch.sign(x) * torch.log1p(x.abs())


def symexp(x):
    return torch.sign(x) * torch.expm1(x.abs())


def twohot(x, bins):
    """(...,) -> (..., N): weights on the two bins around x that sum to 1 and average to x."""
    x = x.clamp(bins[0], bins[-1])
    hi = torch.searchsorted(bins, x.contiguous(), right=True).clamp(1, len(bins) - 1)
    lo = hi - 1
    w_hi = (x - bins[lo]) / (bins[hi] - bins[lo])
    return F.one_hot(lo, len(bins)) * (1 - w_hi)[..., None] + F.one_hot(hi, len(bins)) * w_hi[..., None]


def twohot_mean(probs, bins):
    """(..., N) -> (...,): the inverse of `twohot` (the expectation over the bins)."""
    return (probs * bins).sum(-1)


def categorical(raw, unimix=0.01, sample=True):
    """Raw logits (..., S, K) -> (log unimixed probs, one-hot sample or mode with straight-through grad)."""
    probs = (1 - unimix) * raw.softmax(-1) + unimix / raw.shape[-1]
    if sample:
        idx = torch.multinomial(probs.detach().flatten(0, -2), 1).view(probs.shape[:-1])
    else:
        idx = probs.argmax(-1)
    onehot = F.one_hot(idx, raw.shape[-1]).to(probs.dtype)
    return probs.log(), onehot + (probs - probs.detach())  # straight-through: sample + p - sg(p)


def mlp(inp, units, layers):
    """`layers` x [Linear (no bias) -> LayerNorm(eps 1e-3) -> SiLU]."""
    mods = []
    for i in range(layers):
        mods += [nn.Linear(inp if i == 0 else units, units, bias=False), nn.LayerNorm(units, eps=1e-3), nn.SiLU()]
    return nn.Sequential(*mods)


class ChannelNorm(nn.LayerNorm):
    """LayerNorm over the channels of a (N, C, H, W) map."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def keypoint_convs(c, keypoints):
    """Two full-resolution convs, one feature map per keypoint (spatial_softmax turns each into its x, y)."""
    return nn.Sequential(nn.Conv2d(c, 32, 3, 1, 1), nn.SiLU(), nn.Conv2d(32, keypoints, 3, 1, 1))


def spatial_softmax(maps):
    """(N, K, H, W) feature maps -> (N, 2 K): each map's softmax-weighted x, then y, coordinate in [-1, 1].
    Each map is divided by its std over the image (x 2) before the softmax, which ignores the mean: standardised.
    Untrained maps are nearly flat (std 0.03): every keypoint then sits at the centre whatever the frame (a 2-pixel
    tool moved them 1e-4 on the reach rung),
    and training sat on that plateau for hundreds of steps or for good (r in 3 of 4 seeds, the RSSM once:
    results/dmo_sapo_diamond.md); standardised, the tool moves them ~0.05 from step 0."""
    n, k, h, w = maps.shape
    maps = maps * (2 / (maps.std((2, 3), keepdim=True) + 1e-5))  # the mean need not go: softmax ignores a shift
    p = maps.flatten(2).softmax(-1).view(n, k, h, w)
    xs, ys = torch.linspace(-1, 1, w, device=maps.device), torch.linspace(-1, 1, h, device=maps.device)
    return torch.cat([(p.sum(2) * xs).sum(-1), (p.sum(3) * ys).sum(-1)], 1)


class ConvEncoder(nn.Module):
    def __init__(self, c, mult, keypoints=0):
        super().__init__()
        chans = [c] + [mult * m for m in (1, 2, 4, 8)]
        mods = []
        for i, o in zip(chans[:-1], chans[1:]):
            mods += [nn.Conv2d(i, o, 4, 2, 1, bias=False), ChannelNorm(o, eps=1e-3), nn.SiLU()]
        self.net = nn.Sequential(*mods)
        self.keypoints = None
        if keypoints:
            self.keypoints = keypoint_convs(c, keypoints)

    def forward(self, obs):  # (..., C, H, W) -> (..., 8 mult H/16 W/16 [+ 2 keypoints])
        flat = obs.flatten(0, -4)
        x = self.net(flat).flatten(1)
        if self.keypoints is not None:
            x = torch.cat([x, spatial_softmax(self.keypoints(flat))], 1)
        return x.view(*obs.shape[:-3], -1)


class ConvDecoder(nn.Module):
    def __init__(self, feat, shape, mult):
        super().__init__()
        c, h, w = shape
        self.start = (8 * mult, h // 16, w // 16)
        self.linear = nn.Linear(feat, 8 * mult * (h // 16) * (w // 16))
        chans = [mult * m for m in (8, 4, 2, 1)]
        mods = []
        for i, o in zip(chans[:-1], chans[1:]):
            mods += [nn.ConvTranspose2d(i, o, 4, 2, 1, bias=False), ChannelNorm(o, eps=1e-3), nn.SiLU()]
        self.net = nn.Sequential(*mods, nn.ConvTranspose2d(mult, c, 4, 2, 1))

    def forward(self, feat):  # (..., F) -> (..., C, H, W)
        x = self.net(self.linear(feat.flatten(0, -2)).view(-1, *self.start))
        return x.view(*feat.shape[:-1], *x.shape[1:])


class GRUCell(nn.Module):
    """LayerNorm GRU of DreamerV3: one fused Linear, LayerNorm, update-gate bias -1."""

    def __init__(self, inp, size):
        super().__init__()
        self.linear = nn.Linear(inp + size, 3 * size, bias=False)
        self.norm = nn.LayerNorm(3 * size, eps=1e-3)

    def forward(self, x, h):
        reset, cand, update = self.norm(self.linear(torch.cat([x, h], -1))).chunk(3, -1)
        reset, update = torch.sigmoid(reset), torch.sigmoid(update - 1)
        cand = torch.tanh(reset * cand)
        return update * cand + (1 - update) * h


def stack(states, dim=1):
    return {k: torch.stack([s[k] for s in states], dim) for k in states[0]}


class RSSM(nn.Module):
    def __init__(self, cfg: RSSMConfig):
        super().__init__()
        self.cfg = cfg
        self.image = len(cfg.obs_shape) == 3
        S, K, D, U = cfg.stoch, cfg.classes, cfg.deter, cfg.units
        self.feat_dim = D + S * K
        if self.image:
            self.encoder = ConvEncoder(cfg.obs_shape[0], cfg.cnn_mult, cfg.keypoints)
            self.decoder = ConvDecoder(self.feat_dim, cfg.obs_shape, cfg.cnn_mult)
            self.embed_dim = 8 * cfg.cnn_mult * (cfg.obs_shape[1] // 16) * (cfg.obs_shape[2] // 16) + 2 * cfg.keypoints
        else:
            self.encoder = mlp(cfg.obs_shape[0], U, cfg.mlp_layers)
            self.decoder = nn.Sequential(mlp(self.feat_dim, U, cfg.mlp_layers), nn.Linear(U, cfg.obs_shape[0]))
            self.embed_dim = U
        # img_step: Linear(z ⊕ a) -> LN -> SiLU -> GRU -> MLP -> prior logits; posterior: (h ⊕ embed) -> logits
        self.img_in = mlp(S * K + cfg.action_dim, U, 1)
        self.gru = GRUCell(U, D)
        self.prior_net = nn.Sequential(mlp(D, U, 1), nn.Linear(U, S * K))
        self.post_net = nn.Sequential(mlp(D + self.embed_dim, U, 1), nn.Linear(U, S * K))
        self.h0 = nn.Parameter(torch.zeros(D))  # learned initial state: deter = tanh(h0)
        self.reward_head = nn.Sequential(mlp(self.feat_dim, U, cfg.mlp_layers), nn.Linear(U, cfg.reward_bins))
        nn.init.zeros_(self.reward_head[-1].weight)
        nn.init.zeros_(self.reward_head[-1].bias)
        self.cont_head = nn.Sequential(mlp(self.feat_dim, U, cfg.mlp_layers), nn.Linear(U, 1))
        self.register_buffer("bins", torch.linspace(cfg.reward_lo, cfg.reward_hi, cfg.reward_bins))

    # ---- latent dynamics ----------------------------------------------------------------------------
    def feat(self, state):  # deter ⊕ flattened stoch: (..., D + S K)
        return torch.cat([state["deter"], state["stoch"].flatten(-2)], -1)

    def _logits(self, net, x, sample):  # (B, S K) -> (B, S, K) log probs, stoch
        return categorical(net(x).unflatten(-1, (self.cfg.stoch, self.cfg.classes)), self.cfg.unimix, sample)

    def initial(self, B):
        deter = torch.tanh(self.h0).expand(B, -1)
        logits, stoch = self._logits(self.prior_net, deter, sample=False)
        return dict(deter=deter, stoch=stoch, logits=logits)

    def img_step(self, state, action, sample=True):
        """Prior p(z' | h'), h' = GRU(h, z, a)."""
        x = self.img_in(torch.cat([state["stoch"].flatten(-2), action], -1))
        deter = self.gru(x, state["deter"])
        logits, stoch = self._logits(self.prior_net, deter, sample)
        return dict(deter=deter, stoch=stoch, logits=logits)

    def _posterior(self, deter, embed, sample):
        logits, stoch = self._logits(self.post_net, torch.cat([deter, embed], -1), sample)
        return dict(deter=deter, stoch=stoch, logits=logits)

    def obs_step(self, state, action, embed, is_first, sample=True):
        """Returns (posterior q(z' | h', embed), prior); resets to `initial` and zeroes the action where is_first."""
        if is_first.any():
            init, m = self.initial(len(is_first)), is_first[:, None]
            state = {k: torch.where(m.view(-1, *[1] * (v.dim() - 1)), init[k], v) for k, v in state.items()}
            action = action * (~m).to(action.dtype)
        prior = self.img_step(state, action, sample)
        return self._posterior(prior["deter"], embed, sample), prior

    def decoupled_step(self, state, action, embed, sample=True):
        """DMO step (ALGORITHMS.md §1, Coupled paper §3.4): the value is the posterior from the forward model's
        frame embedding, the gradient w.r.t. (state, action) is that of the prior transition `img_step`."""
        prior = self.img_step(state, action, sample)
        post = self._posterior(prior["deter"].detach(), embed.detach(), sample)
        # s' = s'_prior + sg(s'_post - s'_prior): value s'_post, d s'/d(s, a) = d s'_prior/d(s, a). Both share the
        # GRU output h' (deter: exactly img_step's); stoch = z_post + p_prior - sg(p_prior) (prior straight-through)
        return {k: prior[k] + (post[k] - prior[k]).detach() for k in prior}

    def observe(self, embeds, actions, is_first, state=None, sample=True):
        """(B, T, E), (B, T, A), (B, T) -> posterior and prior states stacked as (B, T, ...)."""
        state = self.initial(embeds.shape[0]) if state is None else state
        posts, priors = [], []
        for t in range(embeds.shape[1]):
            state, prior = self.obs_step(state, actions[:, t], embeds[:, t], is_first[:, t], sample)
            posts.append(state)
            priors.append(prior)
        return stack(posts), stack(priors)

    def imagine(self, state, policy, horizon, sample=True):
        """Roll `policy` (feat -> action) in the prior: states (B, H + 1, ...) from `state` on, actions (B, H, A)."""
        states, actions = [state], []
        for _ in range(horizon):
            action = policy(self.feat(state))
            state = self.img_step(state, action, sample)
            states.append(state)
            actions.append(action)
        return stack(states), torch.stack(actions, 1)

    # ---- observation, reward and continuation heads -------------------------------------------------
    def encode(self, obs):  # (..., *obs_shape) -> (..., E)
        return self.encoder(obs if self.image else symlog(obs))

    def decode(self, feat):  # (..., F) -> (..., *obs_shape), in observation space
        return self.decoder(feat) if self.image else symexp(self.decoder(feat))

    def reward(self, feat):  # (..., F) -> (...,)
        return symexp(twohot_mean(self.reward_head(feat).softmax(-1), self.bins))

    def cont(self, feat):  # (..., F) -> (...,) probability of not terminating
        return torch.sigmoid(self.cont_head(feat).squeeze(-1))

    # ---- world-model loss ---------------------------------------------------------------------------
    def kl_loss(self, post_logits, prior_logits):
        """KL balancing with free nats: (dyn, rep, kl value), KLs summed over the S latents."""
        kl = lambda p, q: (p.exp() * (p - q)).sum((-2, -1))
        dyn = kl(post_logits.detach(), prior_logits)
        rep = kl(post_logits, prior_logits.detach())
        free = self.cfg.free_nats
        return dyn.clamp(min=free).mean(), rep.clamp(min=free).mean(), rep.detach().mean()

    def loss(self, post, prior, obs, rewards, conts, pixel_weight=None):
        """World-model loss on `observe`'s output for (B, T) frames: (total, parts for logging).
        `pixel_weight` (broadcastable to obs) weights each squared error of the reconstruction (default 1)."""
        c = self.cfg
        feat = self.feat(post)
        target = obs if self.image else symlog(obs)
        err = (self.decoder(feat) - target).pow(2)
        if pixel_weight is not None:
            err = err * pixel_weight
        recon = err.flatten(2).sum(-1).mean()  # MSE summed over the frame
        log_p = self.reward_head(feat).log_softmax(-1)
        reward = -(twohot(symlog(rewards), self.bins) * log_p).sum(-1).mean()
        cont = F.binary_cross_entropy_with_logits(self.cont_head(feat).squeeze(-1), conts)
        dyn, rep, kl = self.kl_loss(post["logits"], prior["logits"])
        total = c.recon_scale * recon + c.reward_scale * reward + c.cont_scale * cont
        total = total + c.dyn_scale * dyn + c.rep_scale * rep
        parts = dict(loss=total, recon=recon, reward=reward, cont=cont, dyn=dyn, rep=rep, kl=kl)
        return total, {k: v.detach() for k, v in parts.items()}
