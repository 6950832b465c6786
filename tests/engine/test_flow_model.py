"""The latent flow (engine/models/flow.py): shapes, rows independent of their batch, guidance, solvers, file round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.kinds import Shape, kind_of
from engine.modelfile import export_model, load_model
from engine.models.flow import FlowConfig, LatentFlow

TINY = FlowConfig(latent_dim=8, vae_hidden_dim=16, tokens=4, d_model=16, n_layers=2, n_heads=2, mlp_ratio=2, time_freqs=8, default_steps=4)


def tiny_flow(seed: int = 0) -> LatentFlow:
    """A tiny flow with every weight random (the adaLN-Zero layers too, else every block is the identity)."""
    torch.manual_seed(seed)
    model = LatentFlow(TINY)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
        model.latent_mean.copy_(torch.randn(TINY.latent_dim))
        model.latent_std.copy_(torch.rand(TINY.latent_dim) + 0.5)
    return model.eval()


def batch(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x, t, labels (some of them 'no label'), guidance: every row different."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, TINY.latent_dim, generator=g)
    t = torch.rand(n, generator=g)
    labels = torch.randint(0, TINY.num_classes + 1, (n,), generator=g)
    guidance = 1 + 2 * torch.rand(n, generator=g)
    return x, t, labels, guidance


def test_kind_is_registered() -> None:
    assert kind_of("flow").config_cls is FlowConfig and kind_of("flow").shape is Shape.ITERATIVE
    assert kind_of("flow").module_cls is LatentFlow


@torch.no_grad()
def test_shapes() -> None:
    model = tiny_flow()
    x, t, labels, guidance = batch(5, 1)
    assert model.velocity(x, t, labels).shape == (5, 8)
    assert model.guided_velocity(x, t, labels, guidance).shape == (5, 8)
    dt = torch.full((5,), 0.25)
    for solver in ("euler", "heun"):
        assert model.step(x, t, dt, labels, guidance, solver).shape == (5, 8)
    v = model.velocity(x, t, labels)
    assert model.estimate_clean(x, t, v).shape == (5, 8)
    images = model.sample(x, labels, steps=3, guidance=2.0, solver="euler")
    assert images.shape == (5, 784)
    assert ((images >= 0) & (images <= 1)).all()
    assert model(x, labels).shape == (5, 784)


@torch.no_grad()
def test_a_row_does_not_depend_on_its_batch() -> None:
    """Row 0 of one batch of 16 placed at row 9 of another batch of 16 (every other row different,
    at other times and labels): its velocity and its step are bit for bit the same."""
    model = tiny_flow()
    xa, ta, la, ga = batch(16, 2)
    xb, tb, lb, gb = batch(16, 3)
    for tensor_b, tensor_a in ((xb, xa), (tb, ta), (lb, la), (gb, ga)):
        tensor_b[9] = tensor_a[0]
    dt_a = torch.full((16,), 0.1)
    dt_b = torch.rand(16, generator=torch.Generator().manual_seed(4))
    dt_b[9] = dt_a[0]
    assert torch.equal(model.velocity(xa, ta, la)[0], model.velocity(xb, tb, lb)[9])
    assert torch.equal(model.guided_velocity(xa, ta, la, ga)[0], model.guided_velocity(xb, tb, lb, gb)[9])
    for solver in ("euler", "heun"):
        assert torch.equal(model.step(xa, ta, dt_a, la, ga, solver)[0], model.step(xb, tb, dt_b, lb, gb, solver)[9])
    assert torch.equal(model.decode(xa)[0], model.decode(xb)[9])


@torch.no_grad()
def test_a_row_alone_matches_its_batch_to_rounding() -> None:
    """Alone (a batch of 1) the same row may differ in the last bits (a different matrix-multiply blocking), no more."""
    model = tiny_flow()
    x, t, labels, guidance = batch(16, 5)
    whole = model.guided_velocity(x, t, labels, guidance)
    for i in (0, 7, 15):
        alone = model.guided_velocity(x[i : i + 1], t[i : i + 1], labels[i : i + 1], guidance[i : i + 1])
        torch.testing.assert_close(alone[0], whole[i], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_guidance() -> None:
    model = tiny_flow()
    x, t, labels, _ = batch(6, 6)
    labels[:] = torch.arange(6) % TINY.num_classes  # every row has a label
    null = torch.full_like(labels, TINY.num_classes)
    # the guided batch is one batch of 2B rows: [conditional rows; the same rows with no label]
    both = model.velocity(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null]))
    v_cond, v_uncond = both[:6], both[6:]
    assert torch.equal(model.guided_velocity(x, t, labels, torch.ones(6)), v_cond)  # g = 1: no guidance, exactly
    torch.testing.assert_close(model.guided_velocity(x, t, labels, torch.ones(6)), model.velocity(x, t, labels), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.guided_velocity(x, t, labels, torch.zeros(6)), v_uncond, rtol=1e-5, atol=1e-5)
    g = torch.linspace(0, 4, 6)
    torch.testing.assert_close(model.guided_velocity(x, t, labels, g), v_uncond + g[:, None] * (v_cond - v_uncond), rtol=1e-5, atol=1e-5)
    # a row with no label is the unconditional velocity whatever its guidance
    torch.testing.assert_close(model.guided_velocity(x, t, null, g), model.velocity(x, t, null), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_solvers_and_sample() -> None:
    model = tiny_flow()
    x, t, labels, guidance = batch(4, 7)
    dt = torch.full((4,), 0.2)
    v1 = model.guided_velocity(x, t, labels, guidance)
    torch.testing.assert_close(model.step(x, t, dt, labels, guidance, "euler"), x + 0.2 * v1)
    v2 = model.guided_velocity(x + 0.2 * v1, t + dt, labels, guidance)
    torch.testing.assert_close(model.step(x, t, dt, labels, guidance, "heun"), x + 0.1 * (v1 + v2))
    with pytest.raises(ValueError, match="solver"):
        model.step(x, t, dt, labels, guidance, "rk4")
    # sample = steps equal Euler steps from t = 0, then decode
    z = x
    xs = z
    for i in range(3):
        xs = model.step(xs, torch.full((4,), i / 3), torch.full((4,), 1 / 3), labels, torch.full((4,), 2.0), "euler")
    assert torch.equal(model.sample(z, labels, steps=3, guidance=2.0, solver="euler"), model.decode(xs))
    # estimate_clean: a straight path from x at t reaches x + (1 - t) v at t = 1
    v = model.velocity(x, t, labels)
    torch.testing.assert_close(model.estimate_clean(x, t, v), x + (1 - t)[:, None] * v)


@torch.no_grad()
def test_decode_unnormalises_then_runs_the_vae_decoder() -> None:
    model = tiny_flow()
    x = torch.randn(3, 8)
    z = x * model.latent_std + model.latent_mean
    expected = torch.sigmoid(model.decoder.out(torch.tanh(model.decoder.hidden(z))))
    torch.testing.assert_close(model.decode(x), expected)


def test_export_round_trip(tmp_path: Path) -> None:
    model = tiny_flow()
    path = export_model(tmp_path / "flow.safetensors", "flow", model)
    loaded = load_model(path)
    assert loaded.kind == "flow"
    assert loaded.config == TINY
    assert isinstance(loaded.module, LatentFlow)
    state = loaded.module.state_dict()
    assert {"latent_mean", "latent_std", "decoder.hidden.weight", "decoder.out.weight"} <= set(state)
    for name, tensor in model.state_dict().items():
        assert torch.equal(state[name], tensor), name
    z = torch.randn(10, 8, generator=torch.Generator().manual_seed(8))
    labels = torch.arange(10) % 10
    with torch.no_grad():
        for solver in ("euler", "heun"):
            assert torch.equal(loaded.module.sample(z, labels, solver=solver), model.sample(z, labels, solver=solver))
