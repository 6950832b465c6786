"""Latent rectified flow (flow matching) on the bundled VAE's latent space, decoded by that VAE.

Convention: t = 0 is noise, t = 1 is data; ``x_t = (1 - t) x0 + t x1`` and the network predicts the
velocity ``v = x1 - x0`` (Liu et al. 2022, Lipman et al. 2022). The latent is the VAE encoder's mean,
normalised per dimension by the training latents' mean and std (buffers, so they are exported).

The velocity network is a small DiT (Peebles & Xie 2022): the latent is cut into ``tokens`` patches
of ``latent_dim / tokens`` numbers, each embedded with a learned position; every block is
pre-LayerNorm self-attention and an MLP, modulated by adaLN-Zero from ``time embedding + label
embedding``. The label table has ``num_classes + 1`` rows: the last is the "no label" token of
classifier-free guidance (Ho & Salimans 2022).

Every operation works on each row alone (LayerNorm over features, attention among one row's tokens,
no batch statistics), so a row's velocity does not depend on the other rows of its batch: the
serving engine batches rows that are at different times.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from engine.kinds import Kind, Shape, Steps
from engine.models.vae import MLP2

Solver = Literal["euler", "heun"]


@dataclass(frozen=True)
class FlowConfig:
    latent_dim: int = 20  # the bundled VAE's
    num_classes: int = 10  # label values 0..num_classes-1; num_classes itself = no label
    image_size: int = 28
    # the VAE decoder carried in the file: latent -> vae_hidden_dim (vae_activation) -> image_size^2 logits
    vae_hidden_dim: int = 400
    vae_activation: Literal["tanh", "relu"] = "tanh"
    # the velocity network
    tokens: int = 5  # the latent is cut into this many patches of latent_dim / tokens numbers
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    mlp_ratio: int = 4
    time_freqs: int = 64  # sinusoidal features of t (half sines, half cosines)
    layer_norm_eps: float = 1e-6
    # sampling defaults (the file's recommended settings) and the ceiling a server should enforce
    default_steps: int = 10
    max_steps: int = 200
    default_guidance: float = 1.5
    solver: Solver = "heun"

    @property
    def patch_dim(self) -> int:
        return self.latent_dim // self.tokens

    @property
    def image_dim(self) -> int:
        return self.image_size * self.image_size


def check_config(config: FlowConfig) -> None:
    if config.tokens < 1 or config.latent_dim % config.tokens:
        raise ValueError(f"tokens ({config.tokens}) must divide latent_dim ({config.latent_dim})")
    if config.n_heads < 1 or config.d_model % config.n_heads:
        raise ValueError(f"n_heads ({config.n_heads}) must divide d_model ({config.d_model})")
    if config.time_freqs < 2 or config.time_freqs % 2:
        raise ValueError(f"time_freqs ({config.time_freqs}) must be an even number >= 2")


def timestep_features(t: torch.Tensor, n: int) -> torch.Tensor:
    """Sinusoidal features of t in [0, 1], (B,) -> (B, n); periods from 2pi/1000 to about 2pi*10 in t."""
    half = n // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = (1000.0 * t.float())[:, None] * freqs[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: (B, T, D) * (1 + scale) + shift, scale and shift (B, D)."""
    return x * (1 + scale[:, None, :]) + shift[:, None, :]


class Attention(nn.Module):
    """Multi-head self-attention among one row's tokens (no mask: the tokens are a set of patches)."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.n_heads
        q, k, v = self.qkv(x).view(b, t, 3, h, d // h).permute(2, 0, 3, 1, 4)  # each (B, H, T, D/H)
        att = torch.softmax((q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(d // h)), dim=-1)  # (B, H, T, T)
        y = (att @ v).transpose(1, 2).reshape(b, t, d)
        return self.proj(y)


class Block(nn.Module):
    """DiT block with adaLN-Zero: the condition gives shift, scale and gate of both sub-layers."""

    def __init__(self, config: FlowConfig) -> None:
        super().__init__()
        d = config.d_model
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=config.layer_norm_eps)
        self.attn = Attention(d, config.n_heads)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=config.layer_norm_eps)
        self.mlp = nn.Sequential(nn.Linear(d, config.mlp_ratio * d), nn.GELU(approximate="tanh"), nn.Linear(config.mlp_ratio * d, d))
        self.ada = nn.Linear(d, 6 * d)  # from SiLU(condition)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c).chunk(6, dim=1)
        x = x + gate1[:, None, :] * self.attn(modulate(self.norm1(x), shift1, scale1))
        return x + gate2[:, None, :] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class VelocityNet(nn.Module):
    """DiT over the latent's patches: (x (B, latent), t (B,), labels (B,)) -> velocity (B, latent)."""

    def __init__(self, config: FlowConfig) -> None:
        super().__init__()
        check_config(config)
        self.config = config
        d = config.d_model
        self.patch_in = nn.Linear(config.patch_dim, d)
        self.pos = nn.Parameter(torch.zeros(config.tokens, d))
        self.time_mlp = nn.Sequential(nn.Linear(config.time_freqs, d), nn.SiLU(), nn.Linear(d, d))
        self.label_emb = nn.Embedding(config.num_classes + 1, d)  # last row: no label
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm_out = nn.LayerNorm(d, elementwise_affine=False, eps=config.layer_norm_eps)
        self.ada_out = nn.Linear(d, 2 * d)
        self.patch_out = nn.Linear(d, config.patch_dim)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """DiT's initialisation: Xavier linears, small positions and labels, adaLN-Zero (every block starts as the identity)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.pos, std=0.02)
        nn.init.normal_(self.label_emb.weight, std=0.02)
        for lin in self.time_mlp:
            if isinstance(lin, nn.Linear):
                nn.init.normal_(lin.weight, std=0.02)
        for block in self.blocks:
            assert isinstance(block, Block)
            nn.init.zeros_(block.ada.weight)
            nn.init.zeros_(block.ada.bias)
        for lin in (self.ada_out, self.patch_out):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        b = x.shape[0]
        c = F.silu(self.time_mlp(timestep_features(t, cfg.time_freqs)) + self.label_emb(labels))  # (B, D)
        h = self.patch_in(x.view(b, cfg.tokens, cfg.patch_dim)) + self.pos  # (B, T, D)
        for block in self.blocks:
            h = block(h, c)
        shift, scale = self.ada_out(c).chunk(2, dim=1)
        return self.patch_out(modulate(self.norm_out(h), shift, scale)).reshape(b, cfg.latent_dim)


class LatentFlow(nn.Module):
    """The served model: velocity network, latent normalisation and the VAE decoder, in one file."""

    def __init__(self, config: FlowConfig) -> None:
        super().__init__()
        self.config = config
        self.net = VelocityNet(config)
        self.decoder = MLP2(config.latent_dim, config.vae_hidden_dim, config.image_dim, config.vae_activation)
        self.decoder.requires_grad_(False)  # the VAE's, frozen
        self.register_buffer("latent_mean", torch.zeros(config.latent_dim))
        self.register_buffer("latent_std", torch.ones(config.latent_dim))
        self.latent_mean: torch.Tensor
        self.latent_std: torch.Tensor

    @property
    def null_label(self) -> int:
        return self.config.num_classes

    def velocity(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Velocity at normalised latents x (B, latent) and times t (B,); labels (B,), ``num_classes`` = no label."""
        return self.net(x, t, labels)

    def guided_velocity(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
        """Classifier-free guidance: ``v_uncond + g (v_cond - v_uncond)`` per row, from one batch of 2B rows.

        Written ``v_cond + (g - 1)(v_cond - v_uncond)``, the same value, so that g = 1 gives the
        conditional velocity of that batch exactly.
        """
        b = x.shape[0]
        null = torch.full_like(labels, self.null_label)
        v = self.net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null]))
        v_cond, v_uncond = v[:b], v[b:]
        g = guidance.to(v.dtype)[:, None]
        return v_cond + (g - 1) * (v_cond - v_uncond)

    def step(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        dt: torch.Tensor,
        labels: torch.Tensor,
        guidance: torch.Tensor,
        solver: str | None = None,
    ) -> torch.Tensor:
        """One step of the ODE dx/dt = v from t to t + dt, per row (t, dt, guidance: (B,)); the file's solver by default."""
        solver = self.config.solver if solver is None else solver
        v1 = self.guided_velocity(x, t, labels, guidance)
        x_euler = x + dt[:, None] * v1
        if solver == "euler":
            return x_euler
        if solver != "heun":
            raise ValueError(f"unknown solver {solver!r} (euler or heun)")
        v2 = self.guided_velocity(x_euler, t + dt, labels, guidance)
        return x + dt[:, None] * (0.5 * (v1 + v2))

    def estimate_clean(self, x: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The data point the current velocity heads for: ``x + (1 - t) v`` (normalised latent; for previews)."""
        return x + (1 - t)[:, None] * v

    def estimate(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
        """The clean sample the current guided velocity heads for (what a preview decodes)."""
        return self.estimate_clean(x, t, self.guided_velocity(x, t, labels, guidance))

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised latents (B, latent) -> images (B, image_size^2) in [0, 1]."""
        z = x * self.latent_std + self.latent_mean
        return torch.sigmoid(self.decoder(z))

    def sample(
        self,
        z: torch.Tensor,
        labels: torch.Tensor,
        steps: int | None = None,
        guidance: float | torch.Tensor | None = None,
        solver: str | None = None,
    ) -> torch.Tensor:
        """Reference sampler: from noise z (B, latent) at t = 0 to t = 1 in ``steps`` equal steps, then decode."""
        cfg = self.config
        steps = cfg.default_steps if steps is None else steps
        solver = cfg.solver if solver is None else solver
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        b = z.shape[0]
        g = torch.as_tensor(cfg.default_guidance if guidance is None else guidance, dtype=z.dtype, device=z.device)
        g = g.expand(b) if g.dim() == 0 else g
        dt = torch.full((b,), 1.0 / steps, dtype=z.dtype, device=z.device)
        x = z
        for i in range(steps):
            t = torch.full((b,), i / steps, dtype=z.dtype, device=z.device)
            x = self.step(x, t, dt, labels, g, solver)
        return self.decode(x)

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Images from noise with the file's default steps, guidance and solver."""
        return self.sample(z, labels)


KIND = Kind(
    "flow",
    "latent flow matching (rectified flow): a Transformer velocity network over the VAE's latents, decoded by its decoder",
    FlowConfig,
    LatentFlow,
    Shape.ITERATIVE,
    tile=16,  # rows per call (32 with guidance's unconditional half)
    steps=lambda c: Steps(1, c.max_steps, c.default_steps, c.default_guidance),
    trainer="training.flow:FlowTask",
)
