"""Samplers against closed-form noise predictions: fixed data and Gaussian data with an exact score."""

from __future__ import annotations

import math

import numpy as np
import pytest
from numpy.polynomial import polynomial as P

from core.diffusion.samplers import (
    PLMS_COEFFICIENTS,
    SAMPLER_NAMES,
    NoiseSchedule,
    add_noise,
    make_timesteps,
    plms_combine,
    run_sampler,
)
from core.errors import EngineUnavailable, InvalidOption, JobCancelled

SCHEDULE = NoiseSchedule.official()
ACP = SCHEDULE.alphas_cumprod
SHAPE = (2, 4, 6, 6)


def noise(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(SHAPE).astype(np.float32)


def fixed_data_eps(x0: np.ndarray):
    """The exact eps when all data is `x0`: (x - sqrt(a) x0) / sqrt(1 - a)."""

    def eps(x: np.ndarray, t: int) -> np.ndarray:
        a = ACP[t]
        return (x - math.sqrt(a) * x0) / math.sqrt(1 - a)

    return eps


def gaussian_eps(mu: float, sd: float):
    """The exact eps when data is N(mu, sd^2) per element: x_t ~ N(sqrt(a) mu, a sd^2 + 1 - a)."""

    def eps(x: np.ndarray, t: int) -> np.ndarray:
        a = ACP[t]
        return math.sqrt(1 - a) * (x - math.sqrt(a) * mu) / (a * sd**2 + 1 - a)

    return eps


def gaussian_ode_end(x_t: np.ndarray, t: int, mu: float, sd: float) -> np.ndarray:
    """Where the probability-flow ODE takes `x_t` at acp[0]: the standardised value is conserved."""
    a_t, a_0 = ACP[t], ACP[0]
    z = (x_t - math.sqrt(a_t) * mu) / math.sqrt(a_t * sd**2 + 1 - a_t)
    return math.sqrt(a_0) * mu + math.sqrt(a_0 * sd**2 + 1 - a_0) * z


def test_official_schedule() -> None:
    assert SCHEDULE.betas.shape == SCHEDULE.alphas_cumprod.shape == (1000,)
    assert SCHEDULE.betas.dtype == np.float64
    assert SCHEDULE.betas[0] == pytest.approx(0.00085) and SCHEDULE.betas[-1] == pytest.approx(0.012)
    assert np.sqrt(SCHEDULE.betas[500]) == pytest.approx(
        0.00085**0.5 + (0.012**0.5 - 0.00085**0.5) * 500 / 999
    )
    assert ACP[0] == pytest.approx(1 - 0.00085)
    assert ACP[999] == pytest.approx(np.prod(1 - SCHEDULE.betas))
    assert 0.004 < ACP[999] < 0.005
    with pytest.raises(ValueError):
        SCHEDULE.betas[0] = 1.0


@pytest.mark.parametrize("steps", [50, 20, 25, 100, 1])
def test_timesteps_match_reference_formula(steps: int) -> None:
    reference = np.array(list(range(0, 1000, 1000 // steps))) + 1
    np.testing.assert_array_equal(make_timesteps(steps), reference[::-1])


def test_timesteps_known_values() -> None:
    assert make_timesteps(50)[:3].tolist() == [981, 961, 941] and make_timesteps(50)[-1] == 1
    assert make_timesteps(20)[:2].tolist() == [951, 901]
    odd = make_timesteps(30)
    assert len(odd) == 30 and odd[-1] == 1 and np.all(np.diff(odd) == -33)
    full = make_timesteps(1000)
    assert full[0] == 999 and full[-1] == 0 and len(full) == 1000


@pytest.mark.parametrize(
    ("steps", "strength", "kept"), [(20, 0.3, 6), (20, 0.75, 15), (50, 0.01, 1), (10, 0.55, 6)]
)
def test_strength_keeps_the_last_steps(steps: int, strength: float, kept: int) -> None:
    ts = make_timesteps(steps, strength)
    assert len(ts) == kept
    np.testing.assert_array_equal(ts, make_timesteps(steps)[-kept:])


@pytest.mark.parametrize(
    ("steps", "strength"),
    [
        (0, 1.0),
        (1001, 1.0),
        (-5, 1.0),
        (2.5, 1.0),
        (True, 1.0),
        (20, 0.0),
        (20, 1.01),
        (20, -0.5),
        (20, float("nan")),
        ("20", 1.0),
    ],
)
def test_bad_timestep_options(steps: object, strength: object) -> None:
    with pytest.raises(InvalidOption):
        make_timesteps(steps, strength)  # type: ignore[arg-type]


def test_add_noise() -> None:
    x0, eps = noise(1), noise(2)
    out = add_noise(SCHEDULE, x0, eps, 500)
    assert out.dtype == np.float32
    np.testing.assert_allclose(
        out, np.sqrt(ACP[500]) * x0 + np.sqrt(1 - ACP[500]) * eps, rtol=1e-5, atol=1e-6
    )
    with pytest.raises(InvalidOption):
        add_noise(SCHEDULE, x0, eps, 1000)
    with pytest.raises(InvalidOption):
        add_noise(SCHEDULE, x0, eps[:1], 10)
    with pytest.raises(InvalidOption):
        add_noise(SCHEDULE, x0, eps, "10")  # type: ignore[arg-type]


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_recovers_fixed_data_from_pure_noise(name: str) -> None:
    x0 = noise(3) * 0.5 + 0.2
    x_t = noise(4)
    ts = make_timesteps(20)
    out = run_sampler(name, fixed_data_eps(x0), x_t, ts, SCHEDULE)
    assert out.dtype == np.float32 and out.shape == SHAPE
    # The ODE for one data point keeps the noise direction; it ends at acp[0] with a trace of it.
    z = (x_t - np.sqrt(ACP[ts[0]]) * x0) / np.sqrt(1 - ACP[ts[0]])
    np.testing.assert_allclose(out, np.sqrt(ACP[0]) * x0 + np.sqrt(1 - ACP[0]) * z, atol=2e-4)
    assert np.sqrt(np.mean((out - x0) ** 2)) < 0.04


def gaussian_error(name: str, steps: int, mu: float = 1.0, sd: float = 2.0) -> float:
    ts = make_timesteps(steps)
    x_t = noise(5)
    out = run_sampler(name, gaussian_eps(mu, sd), x_t, ts, SCHEDULE)
    return float(np.abs(out - gaussian_ode_end(x_t, int(ts[0]), mu, sd)).max())


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_more_steps_smaller_error(name: str) -> None:
    errors = [gaussian_error(name, steps) for steps in (10, 20, 50)]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.15


def test_dpmpp_beats_ddim_at_ten_steps() -> None:
    dpm, ddim = gaussian_error("dpm++2m", 10), gaussian_error("ddim", 10)
    assert dpm < 0.6 * ddim


def adams_bashforth(order: int) -> list[float]:
    """Weights of f(0), f(-1), ... for integrating over [0, 1] the polynomial through those points."""
    nodes = [-k for k in range(order)]
    weights = []
    for j, node in enumerate(nodes):
        basis = np.array([1.0])
        for m, other in enumerate(nodes):
            if m != j:
                basis = P.polymul(basis, np.array([-other, 1.0]) / (node - other))
        integral = P.polyint(basis)
        weights.append(float(P.polyval(1.0, integral) - P.polyval(0.0, integral)))
    return weights


@pytest.mark.parametrize("history", [1, 2, 3])
def test_plms_coefficients_are_adams_bashforth(history: int) -> None:
    np.testing.assert_allclose(PLMS_COEFFICIENTS[history], adams_bashforth(history + 1), rtol=1e-12)
    assert sum(PLMS_COEFFICIENTS[history]) == pytest.approx(1.0)


def test_plms_combine_uses_newest_history_first() -> None:
    e = [np.full(3, v, dtype=np.float32) for v in (1.0, 2.0, 4.0, 8.0, 16.0)]
    np.testing.assert_allclose(plms_combine(e[4], e[:4]), (55 * 16 - 59 * 8 + 37 * 4 - 9 * 2) / 24)
    np.testing.assert_allclose(plms_combine(e[2], e[:2]), (23 * 4 - 16 * 2 + 5 * 1) / 12)
    np.testing.assert_allclose(plms_combine(e[1], e[:1]), (3 * 2 - 1) / 2)


def ddim_move(x: np.ndarray, eps: np.ndarray, a: float, a_next: float) -> np.ndarray:
    return np.sqrt(a_next) * (x - np.sqrt(1 - a) * eps) / np.sqrt(a) + np.sqrt(1 - a_next) * eps


def test_plms_warm_up_and_second_step() -> None:
    """Eps values that ignore x make the first two PLMS steps checkable by hand."""
    values = [0.3, -0.1, 0.5, 0.2]
    calls: list[int] = []

    def eps_fn(x: np.ndarray, t: int) -> np.ndarray:
        calls.append(t)
        return np.full_like(x, values[len(calls) - 1])

    ts = make_timesteps(50)[:2]
    x = np.full((1, 1), 1.0, dtype=np.float32)
    out = run_sampler("plms", eps_fn, x, ts, SCHEDULE)
    assert calls == [ts[0], ts[1], ts[1]]
    a0, a1, end = ACP[ts[0]], ACP[ts[1]], ACP[0]
    x1 = ddim_move(1.0, (0.3 + -0.1) / 2, a0, a1)  # improved Euler: mean of eps here and at the target
    x2 = ddim_move(x1, (3 * 0.5 - 0.3) / 2, a1, end)  # Adams-Bashforth 2 with the first step's own eps
    np.testing.assert_allclose(out, [[x2]], rtol=1e-5)


@pytest.mark.parametrize(("name", "extra"), [("ddim", 0), ("dpm++2m", 0), ("plms", 1)])
@pytest.mark.parametrize("steps", [1, 7, 20])
def test_eps_calls_and_progress(name: str, extra: int, steps: int) -> None:
    calls: list[int] = []
    progress: list[tuple[int, int]] = []

    def eps_fn(x: np.ndarray, t: int) -> np.ndarray:
        assert isinstance(t, int) and x.dtype == np.float32
        calls.append(t)
        return np.zeros_like(x)

    ts = make_timesteps(steps)
    run_sampler(name, eps_fn, noise(), ts, SCHEDULE, on_step=lambda i, n: progress.append((i, n)))
    assert len(calls) == steps + extra
    assert progress == [(i, steps) for i in range(1, steps + 1)]
    if name != "plms":
        assert calls == ts.tolist()


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_deterministic_and_input_untouched(name: str) -> None:
    x = noise(7)
    before = x.copy()
    ts = make_timesteps(8)
    first = run_sampler(name, gaussian_eps(0.0, 0.7), x, ts, SCHEDULE)
    second = run_sampler(name, gaussian_eps(0.0, 0.7), x, ts, SCHEDULE)
    assert first.tobytes() == second.tobytes()
    np.testing.assert_array_equal(x, before)
    assert run_sampler(name, gaussian_eps(0.0, 0.7), x.astype(np.float64), ts, SCHEDULE).dtype == np.float32


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_cancellation_before_a_step(name: str) -> None:
    calls: list[int] = []
    done: list[int] = []

    def eps_fn(x: np.ndarray, t: int) -> np.ndarray:
        calls.append(t)
        return np.zeros_like(x)

    with pytest.raises(JobCancelled):
        run_sampler(
            name,
            eps_fn,
            noise(),
            make_timesteps(10),
            SCHEDULE,
            on_step=lambda i, n: done.append(i),
            cancelled=lambda: len(done) >= 3,
        )
    assert done == [1, 2, 3]
    assert len(calls) == (4 if name == "plms" else 3)
    with pytest.raises(JobCancelled):
        run_sampler(name, eps_fn, noise(), make_timesteps(10), SCHEDULE, cancelled=lambda: True)


@pytest.mark.parametrize("name", ["euler", "", "DDIM", None, 3])
def test_unknown_sampler(name: object) -> None:
    with pytest.raises(InvalidOption) as info:
        run_sampler(name, fixed_data_eps(noise()), noise(), make_timesteps(5), SCHEDULE)  # type: ignore[arg-type]
    assert all(allowed in str(info.value) for allowed in SAMPLER_NAMES)


@pytest.mark.parametrize(
    "timesteps",
    [
        np.array([], dtype=np.int64),
        np.array([1, 5]),
        np.array([1000, 5]),
        np.array([5, 5]),
        np.array([9.0, 1.0]),
        np.array([[9, 1]]),
        np.array([5, -1]),
    ],
)
def test_bad_timesteps(timesteps: np.ndarray) -> None:
    with pytest.raises(InvalidOption):
        run_sampler("ddim", fixed_data_eps(noise()), noise(), timesteps, SCHEDULE)


def test_bad_latents_and_model_output() -> None:
    ts = make_timesteps(3)
    with pytest.raises(InvalidOption):
        run_sampler("ddim", fixed_data_eps(noise()), np.zeros(SHAPE, dtype=np.int64), ts, SCHEDULE)
    with pytest.raises(EngineUnavailable, match="shape"):
        run_sampler("ddim", lambda x, t: x[:1], noise(), ts, SCHEDULE)
    with pytest.raises(EngineUnavailable, match="NaN"):
        run_sampler("dpm++2m", lambda x, t: np.full_like(x, np.nan), noise(), ts, SCHEDULE)


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_img2img_from_a_noised_image(name: str) -> None:
    """Strength < 1: noise an image to the first kept timestep, then denoise back to it."""
    x0 = noise(8) * 0.5
    ts = make_timesteps(20, strength=0.5)
    start = add_noise(SCHEDULE, x0, noise(9), int(ts[0]))
    out = run_sampler(name, fixed_data_eps(x0), start, ts, SCHEDULE)
    assert np.sqrt(np.mean((out - x0) ** 2)) < 0.04
