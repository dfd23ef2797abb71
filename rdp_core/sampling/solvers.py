"""Reverse-time solvers for the VP-SDE, as small step functions over one epsilon-model interface.

A solver is built once for a time grid; its constructor computes every per-step coefficient in float64 on
the host, and `step(model, x, i, noise)` is then plain tensor arithmetic (no host synchronisation, no
Python branch on device values), so the same step serves eager sampling, CUDA-graph capture and the
checkpointed adjoint. Nothing here disables autograd: attacks differentiate through these loops.

The model is an epsilon predictor `model(x_t, t)`, t a tensor of shape (batch,) with continuous VP time
(see rdp_core.sampling.schedule for the convention and the discrete-index correspondence).

Solvers (`make_solver` names):
  "sde"       Euler-Maruyama on the reverse SDE; DiffPure's default, dt = 1e-3 (100 steps at t* = 0.1).
  "ode-euler" Euler on the probability-flow ODE (alias "ode").
  "ode-heun"  Heun on the probability-flow ODE; a last step that ends at t = 0 is an Euler step, since the
              epsilon model's score eps / sigma(t) is undefined at sigma = 0.
  "ddpm"      Ancestral sampling of the 1000-step DDPM chain with step respacing (posterior variance
              "fixed small", as guided-diffusion).
  "ddim"      DDIM on the same chain with respacing; eta = 0 (deterministic) by default.
"""
import math

from rdp_core.sampling.schedule import VP

DIFFPURE_DT = 1e-3


def uniform_times(t_start, steps, t_end=0.0):
    """`steps + 1` equally spaced times from t_start to t_end (float64 Python floats)."""
    if steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps}")
    # The last point is t_end itself: the interpolation formula can miss it by a rounding error (-1e-17).
    return [t_start + (t_end - t_start) * k / steps for k in range(steps)] + [t_end]


def respaced_indices(t_star, steps=None, schedule=VP):
    """Descending discrete indices of a respaced DDPM chain from t* down to index 0.

    t* must sit on the discrete grid (a multiple of 1 / N): k = N t* indices {k-1, ..., 0} are available,
    and `steps` of them (default: all k) are taken evenly spaced, always including k-1 and 0.
    """
    n = schedule.num_discrete_steps
    k = round(t_star * n)
    if k < 1 or abs(t_star * n - k) > 1e-6:
        raise ValueError(
            f"discrete solvers run on the {n}-step DDPM chain: t_star must be a positive multiple of "
            f"1/{n}, got {t_star}"
        )
    steps = k if steps is None else steps
    if not 1 <= steps <= k:
        raise ValueError(f"steps must be in [1, {k}] for t_star = {t_star} on the {n}-step chain, got {steps}")
    if steps == 1:
        return [k - 1]
    # floor(v + 0.5) of points at least 1 apart is strictly decreasing, so no index repeats.
    return [math.floor((k - 1) * (1 - j / (steps - 1)) + 0.5) for j in range(steps)]


class ReverseSolver:
    """Base class: a fixed grid of `num_steps` steps and the alpha_bar at which sampling starts."""

    stochastic = False
    start_alpha_bar: float
    model_times: list

    @property
    def num_steps(self):
        return len(self.model_times)

    def step(self, model, x, i, noise=None):
        raise NotImplementedError

    def sample(self, model, x, noise=None, progress=False):
        """Runs every step from the start state `x`; `noise(i)` gives step i's standard-normal draw."""
        if self.stochastic and noise is None:
            raise ValueError(f"{type(self).__name__} is stochastic: pass noise (e.g. a StepNoise)")
        steps = range(self.num_steps)
        if progress:
            from tqdm.auto import tqdm

            steps = tqdm(steps, desc=type(self).__name__, unit="step", leave=False)
        for i in steps:
            x = self.step(model, x, i, noise)
        return x

    def _eps(self, model, x, i):
        t = x.new_full((x.shape[0],), self.model_times[i])
        return model(x, t).to(x.dtype)


class EulerMaruyama(ReverseSolver):
    """x <- x + h beta (x / 2 + score) + sqrt(beta h) z, score = -eps / sigma, on a descending grid."""

    stochastic = True

    def __init__(self, times, schedule=VP):
        _check_grid(times, descending=True)
        self.times = list(times)
        self.model_times = self.times[:-1]
        self.start_alpha_bar = schedule.alpha_bar(self.times[0])
        self._coefs = []
        for t, t_next in zip(self.times[:-1], self.times[1:]):
            h, beta = t - t_next, schedule.beta(t)
            self._coefs.append((1.0 + 0.5 * h * beta, h * beta / schedule.sigma(t), math.sqrt(beta * h)))

    def step(self, model, x, i, noise=None):
        c_x, c_eps, c_z = self._coefs[i]
        return c_x * x - c_eps * self._eps(model, x, i) + c_z * noise(i)


class ProbabilityFlowEuler(ReverseSolver):
    """Euler on dx/dt = -beta(t) / 2 (x - eps / sigma(t)); the grid may run either way in time."""

    def __init__(self, times, schedule=VP):
        _check_grid(times, descending=None)
        self.times = list(times)
        self.model_times = self.times[:-1]
        self.start_alpha_bar = schedule.alpha_bar(self.times[0])
        self._schedule = schedule

    def _drift_coefs(self, t):
        beta = self._schedule.beta(t)
        return -0.5 * beta, 0.5 * beta / self._schedule.sigma(t)

    def _drift(self, model, x, t):
        c_x, c_eps = self._drift_coefs(t)
        return c_x * x + c_eps * model(x, x.new_full((x.shape[0],), t)).to(x.dtype)

    def step(self, model, x, i, noise=None):
        t, t_next = self.times[i], self.times[i + 1]
        return x + (t_next - t) * self._drift(model, x, t)


class ProbabilityFlowHeun(ProbabilityFlowEuler):
    """Heun (trapezoidal predictor-corrector) on the probability-flow ODE; 2 model calls per step."""

    def step(self, model, x, i, noise=None):
        t, t_next = self.times[i], self.times[i + 1]
        d1 = self._drift(model, x, t)
        x_euler = x + (t_next - t) * d1
        if t_next == 0.0:
            return x_euler
        return x + (t_next - t) * 0.5 * (d1 + self._drift(model, x_euler, t_next))


class _DiscreteSolver(ReverseSolver):
    """Shared set-up of DDPM and DDIM: respaced alpha_bars and the clipped x0 estimate."""

    def __init__(self, indices, schedule=VP, clip_denoised=True):
        _check_indices(indices, schedule)
        alpha_bars = schedule.discrete_alpha_bars().tolist()
        self.indices = list(indices)
        self.model_times = [schedule.discrete_time(i) for i in self.indices]
        self.alpha_bars = [alpha_bars[i] for i in self.indices] + [1.0]
        self.start_alpha_bar = self.alpha_bars[0]
        self.clip_denoised = clip_denoised

    def _denoise(self, model, x, i):
        """(x0_hat, eps) at step i; x0_hat clipped to [-1, 1] (and eps made consistent) if asked."""
        ab = self.alpha_bars[i]
        eps = self._eps(model, x, i)
        x0 = (x - math.sqrt(1.0 - ab) * eps) / math.sqrt(ab)
        if self.clip_denoised:
            x0 = x0.clamp(-1.0, 1.0)
            eps = (x - math.sqrt(ab) * x0) / math.sqrt(1.0 - ab)
        return x0, eps


class DDPMAncestral(_DiscreteSolver):
    """x_prev ~ q(x_prev | x_t, x0_hat): posterior mean plus posterior ("fixed small") standard deviation."""

    stochastic = True

    def __init__(self, indices, schedule=VP, clip_denoised=True):
        super().__init__(indices, schedule, clip_denoised)
        self._coefs = []
        for ab, ab_prev in zip(self.alpha_bars[:-1], self.alpha_bars[1:]):
            beta = 1.0 - ab / ab_prev
            c_x0 = beta * math.sqrt(ab_prev) / (1.0 - ab)
            c_x = (1.0 - ab_prev) * math.sqrt(1.0 - beta) / (1.0 - ab)
            self._coefs.append((c_x0, c_x, math.sqrt(beta * (1.0 - ab_prev) / (1.0 - ab))))

    def step(self, model, x, i, noise=None):
        c_x0, c_x, c_z = self._coefs[i]
        x0, _ = self._denoise(model, x, i)
        mean = c_x0 * x0 + c_x * x
        return mean + c_z * noise(i) if c_z > 0.0 else mean


class DDIM(_DiscreteSolver):
    """x_prev = sqrt(ab_prev) x0_hat + sqrt(1 - ab_prev - s^2) eps + s z, s proportional to eta."""

    def __init__(self, indices, schedule=VP, clip_denoised=True, eta=0.0):
        super().__init__(indices, schedule, clip_denoised)
        if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0.0 <= eta < math.inf:
            raise ValueError(f"eta must be a finite number >= 0, got {eta!r}")
        self.stochastic = eta > 0.0
        self._coefs = []
        for ab, ab_prev in zip(self.alpha_bars[:-1], self.alpha_bars[1:]):
            s = eta * math.sqrt((1.0 - ab_prev) / (1.0 - ab) * (1.0 - ab / ab_prev))
            self._coefs.append((math.sqrt(ab_prev), math.sqrt(max(1.0 - ab_prev - s * s, 0.0)), s))

    def step(self, model, x, i, noise=None):
        c_x0, c_eps, c_z = self._coefs[i]
        x0, eps = self._denoise(model, x, i)
        out = c_x0 * x0 + c_eps * eps
        return out + c_z * noise(i) if c_z > 0.0 else out


SOLVERS = ("sde", "ode", "ode-euler", "ode-heun", "ddpm", "ddim")


def default_steps(solver, t_star, schedule=VP):
    """DiffPure's dt = 1e-3 for the continuous solvers; the whole chain below t* for the discrete ones."""
    if solver in ("ddpm", "ddim"):
        return round(t_star * schedule.num_discrete_steps)
    return max(1, round(t_star / DIFFPURE_DT))


def make_solver(solver, t_star, steps=None, schedule=VP, **options):
    """The reverse solver `solver` (one of SOLVERS) from t* down to 0 with `steps` steps."""
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; expected one of {SOLVERS}")
    if isinstance(t_star, bool) or not isinstance(t_star, (int, float)) or not 0.0 < t_star <= 1.0:
        raise ValueError(f"t_star must be a number in (0, 1], got {t_star!r}")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValueError(f"steps must be a positive integer or None, got {steps!r}")
    if solver in ("ddpm", "ddim"):
        cls = DDPMAncestral if solver == "ddpm" else DDIM
        return cls(respaced_indices(t_star, steps, schedule), schedule, **options)
    if options:
        raise ValueError(f"solver {solver!r} takes no options, got {sorted(options)}")
    times = uniform_times(float(t_star), steps or default_steps(solver, t_star, schedule))
    cls = {"sde": EulerMaruyama, "ode": ProbabilityFlowEuler, "ode-euler": ProbabilityFlowEuler,
           "ode-heun": ProbabilityFlowHeun}[solver]
    return cls(times, schedule)


def _check_grid(times, descending):
    """`descending`: True for a reverse-time grid, None for a monotone grid in either direction."""
    if len(times) < 2:
        raise ValueError(f"a time grid needs at least 2 points, got {len(times)}")
    if min(times) < 0.0 or max(times) > 1.0:
        raise ValueError(f"times must lie in [0, 1], got [{min(times)}, {max(times)}]")
    diffs = [b - a for a, b in zip(times[:-1], times[1:])]
    if descending and not all(d < 0 for d in diffs):
        raise ValueError("reverse-SDE times must be strictly decreasing")
    if not descending and not (all(d < 0 for d in diffs) or all(d > 0 for d in diffs)):
        raise ValueError("ODE times must be strictly monotone")
    if 0.0 in times[:-1]:
        raise ValueError(
            "the epsilon model is evaluated at every grid time but the last, and its score eps / sigma(t) "
            "is undefined at t = 0: only the last time may be 0"
        )


def _check_indices(indices, schedule):
    n = schedule.num_discrete_steps
    if len(indices) < 1 or any(not 0 <= i < n for i in indices):
        raise ValueError(f"discrete indices must lie in [0, {n}), got {list(indices)}")
    if any(b >= a for a, b in zip(indices[:-1], indices[1:])):
        raise ValueError("discrete indices must be strictly decreasing")
