"""Inter-layer objective: minimise ΔL(x) = l·x + ½ xᵀGx over one-hot x per layer, cost ≤ budget.

Exact path (small models): a MILP solved by HiGHS (``scipy.optimize.milp``). With one-hot
layers, x_a x_b = 0 for two candidates of the same layer and x_a² = x_a, so

    ΔL(x) = Σ_a (l_a + ½ G_aa) x_a + Σ_{i<j} Σ_{a∈i, b∈j} G_ab y_ab,   y_ab = x_a x_b.

The products are linearized in the aggregated one-hot (RLT) form: for every pair of layers
i<j whose G block is non-zero,

    Σ_{b∈j} y_ab = x_a  (a ∈ i),     Σ_{a∈i} y_ab = x_b  (b ∈ j),     y ≥ 0.

For binary one-hot x these force y_ab = x_a x_b exactly (x_a = 1 leaves one non-zero x_b in
layer j, and y_ab ≤ x_b), whatever the sign of G_ab, so the MILP optimum is the exact optimum.
Its LP relaxation is tighter than the entrywise McCormick form (y ≥ x_a + x_b − 1, y ≤ x_a,
y ≤ x_b). The objective is scaled to max |coefficient| = 1 before solving so that HiGHS's
absolute tolerances are relative to the problem; ``mip_rel_gap`` is 0.

Heuristic path (large models, or the MILP hit its time limit): start from the greedy
solution, the Ω-optimal and the separable-part-optimal configurations (both exact by the
knapsack DP) and HiGHS's incumbent if any; then best-improvement local search over
single-layer changes and pairs of changes in two layers (one up, another down) within the
budget, and a seeded iterated local search (random kicks of three layers, repaired into the
budget, descended again, kept when better).

Every result carries a valid lower bound on the optimum and hence the gap = value − bound ≥ 0:
the largest of the MILP's own dual bound (when it ran into its time limit), the LP relaxation
of the RLT MILP (when small enough), a convex relaxation solved by Frank–Wolfe, and the
row-minimum bound (see the functions below). ``proven_optimal`` means gap = 0: HiGHS proved
optimality (``mip_rel_gap`` = 0, absolute tolerance 1e-6 on the scaled objective), or a
heuristic solution met a bound within a relative 1e-9.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
from scipy.linalg import eigh
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_matrix

from planner.frontier import InfeasibleBudget, diagonal_frontier, min_cost, nondominated_indices, solve_budget
from planner.objective import BUDGET_RTOL, Choice, Objective, within_budget

DEFAULT_TIME_LIMIT_S = 10.0
MAX_MILP_VARIABLES = 20_000  # product variables y; above it the exact MILP is not attempted
MAX_LP_VARIABLES = 60_000  # above it the LP relaxation bound is skipped (the cheaper bounds remain)
MAX_LOCAL_SEARCH_MOVES = 10_000
KICKS = 30  # random restarts of the iterated local search
MIN_FRANK_WOLFE_ITERATIONS = 20  # even past the deadline: a bound from one iteration is usually poor
PROOF_RTOL = 1e-9  # a heuristic solution is proven optimal when its gap is below this (relative)


@dataclass(frozen=True)
class QuadraticResult:
    """A configuration for one budget, with its predicted ΔL and a lower bound on the optimum.

    ``method`` says how the configuration was found (``milp``, ``milp+local-search``,
    ``heuristic``); ``bound_method`` where the lower bound comes from (``milp``,
    ``milp-dual-bound``, ``lp-relaxation``, ``convex-relaxation``, ``row-minimum``).
    """

    choice: Choice
    cost: float
    value: float  # ΔL(c) = l·x + ½ xᵀGx
    lower_bound: float  # ≤ the least ΔL of any configuration with cost ≤ budget
    proven_optimal: bool
    method: str
    bound_method: str
    budget: float
    seconds: float

    @property
    def gap(self) -> float:
        """value − lower_bound ≥ 0; 0 when proven optimal."""
        return self.value - self.lower_bound

    @property
    def relative_gap(self) -> float:
        return self.gap / max(abs(self.value), abs(self.lower_bound), 1e-300)

    def to_dict(self) -> dict[str, object]:
        return {
            "choice": list(self.choice),
            "cost": self.cost,
            "value": self.value,
            "lower_bound": self.lower_bound,
            "gap": self.gap,
            "proven_optimal": self.proven_optimal,
            "method": self.method,
            "bound_method": self.bound_method,
            "budget": self.budget,
            "seconds": self.seconds,
        }


# ----- public entry points ------------------------------------------------------------------


def solve_quadratic(
    objective: Objective,
    kind: str,
    budget: float,
    *,
    method: str = "auto",
    time_limit: float = DEFAULT_TIME_LIMIT_S,
    max_milp_variables: int = MAX_MILP_VARIABLES,
    max_lp_variables: int = MAX_LP_VARIABLES,
) -> QuadraticResult:
    """Least ΔL configuration with cost ≤ budget.

    ``method``: ``auto`` (exact MILP when its product variables ≤ ``max_milp_variables``, else
    the heuristic), ``milp`` (always the MILP) or ``heuristic``. ``time_limit`` bounds each
    phase (the MILP, the local search, the bounds), so a call takes at most about 3× it.
    Raises ``InfeasibleBudget`` when the budget is below the cheapest configuration.
    """
    if method not in ("auto", "milp", "heuristic"):
        raise ValueError(f"method must be 'auto', 'milp' or 'heuristic', got {method!r}")
    start = time.perf_counter()
    problem = _Problem(objective, kind, budget)
    use_milp = method == "milp" or (method == "auto" and problem.n_products <= max_milp_variables)
    result = _solve_milp(problem, time_limit) if use_milp else _solve_heuristic(problem, time_limit, max_lp_variables)
    return replace(result, seconds=time.perf_counter() - start)


def quadratic_frontier(
    objective: Objective,
    kind: str,
    budgets: Sequence[float] | None = None,
    *,
    max_points: int = 16,
    **solve_options: object,
) -> list[QuadraticResult]:
    """Solve at several budgets and keep the non-dominated (cost, ΔL) results, by cost.

    Default budgets: the distinct costs of the diagonal (Ω) frontier, thinned evenly to at most
    ``max_points`` (always keeping the cheapest and the most expensive).
    """
    if budgets is None:
        budgets = default_budgets(objective, kind, max_points)
    results = [solve_quadratic(objective, kind, float(b), **solve_options) for b in budgets]  # type: ignore[arg-type]
    if not results:
        return []
    keep = nondominated_indices(np.array([r.cost for r in results]), np.array([r.value for r in results]))
    return [results[k] for k in keep]


def default_budgets(objective: Objective, kind: str, max_points: int) -> list[float]:
    """Distinct costs of the diagonal frontier, thinned evenly to at most ``max_points``."""
    costs = np.unique(diagonal_frontier(objective, kind).costs)
    if len(costs) > max_points:
        costs = costs[np.unique(np.linspace(0, len(costs) - 1, max_points).round().astype(int))]
    return [float(c) for c in costs]


def row_minimum_bound(objective: Objective, kind: str, budget: float) -> float:
    """A valid lower bound on min ΔL over cost ≤ budget, cheap for any size.

    For one-hot x, ½ xᵀGx = ½ Σᵢ [G_{cᵢcᵢ} + Σ_{j≠i} G_{cᵢcⱼ}] ≥ ½ Σᵢ [G_{cᵢcᵢ} + Σ_{j≠i} min_{b∈j} G_{cᵢb}],
    so ΔL(c) ≥ Σᵢ wᵢ(cᵢ) with w_a = l_a + ½ G_aa + ½ Σ_{j≠layer(a)} min_{b∈j} G_ab, a separable
    objective whose exact minimum within the budget the knapsack DP gives.
    """
    return _row_minimum_bound(_Problem(objective, kind, budget))


# ----- the problem in flat arrays -----------------------------------------------------------


class _Problem:
    """Flat arrays of one (objective, cost kind, budget) instance."""

    def __init__(self, objective: Objective, kind: str, budget: float) -> None:
        self.objective = objective
        self.kind = kind
        self.budget = float(budget)
        self.l = objective.flat_linear
        self.G = objective.G
        self.diag = np.diag(self.G).copy()
        self.cost = objective.flat_cost(kind)
        self.offsets = objective.offsets
        self.layer_of = objective.layer_of
        cheapest = min_cost(objective, kind)
        if not within_budget(cheapest, self.budget):
            raise InfeasibleBudget(kind, self.budget, cheapest)
        self.pairs = self._coupled_pairs()
        self.n_products = sum(self.width(i) * self.width(j) for i, j in self.pairs)

    def width(self, i: int) -> int:
        return int(self.offsets[i + 1] - self.offsets[i])

    def _coupled_pairs(self) -> list[tuple[int, int]]:
        """Layer pairs i<j whose G block has a non-zero entry (only those need products)."""
        starts = self.offsets[:-1]
        nonzero = np.add.reduceat(np.add.reduceat(np.abs(self.G) > 0, starts, axis=0), starts, axis=1)
        i, j = np.nonzero(np.triu(nonzero, k=1))
        return list(zip(i.tolist(), j.tolist()))

    def separable(self) -> tuple[np.ndarray, ...]:
        """Per-layer l + ½ diag G, the part of ΔL that ignores other layers."""
        return self._per_layer(self.l + 0.5 * self.diag)

    def _per_layer(self, flat: np.ndarray) -> tuple[np.ndarray, ...]:
        return tuple(np.split(flat, self.offsets[1:-1]))

    def support(self, choice: Choice) -> np.ndarray:
        return self.offsets[:-1] + np.asarray(choice, dtype=np.int64)

    def choice(self, support: np.ndarray) -> Choice:
        return tuple(int(a) for a in support - self.offsets[:-1])

    def value(self, support: np.ndarray) -> float:
        return float(self.l[support].sum() + 0.5 * self.G[np.ix_(support, support)].sum())

    def result(self, support: np.ndarray, lower_bound: float, method: str, bound_method: str) -> QuadraticResult:
        """A result whose gap is ≥ 0, and 0 exactly when it is proven optimal."""
        value = self.value(support)
        proven = value - lower_bound <= PROOF_RTOL * max(1.0, abs(value))
        return QuadraticResult(
            choice=self.choice(support),
            cost=float(self.cost[support].sum()),
            value=value,
            lower_bound=value if proven else lower_bound,
            proven_optimal=proven,
            method=method,
            bound_method=bound_method,
            budget=self.budget,
            seconds=0.0,
        )


# ----- exact: MILP --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Solved:
    support: np.ndarray | None  # incumbent, None when HiGHS found none
    bound: float  # valid lower bound (−inf when none)
    optimal: bool


def _solve_milp(problem: _Problem, time_limit: float) -> QuadraticResult:
    solved = _run_highs(problem, time_limit, integer=True)
    if solved.optimal and solved.support is not None:  # proven by HiGHS: the bound is the value
        return problem.result(solved.support, problem.value(solved.support), "milp", "milp")
    # time limit: local search from HiGHS's incumbent (if any) and the heuristic starts
    starts = _heuristic_starts(problem) + ([solved.support] if solved.support is not None else [])
    support = _best_local_search(problem, starts, deadline=time.perf_counter() + time_limit)
    bound, bound_method = _best_bound(problem, support, time_limit, max_lp_variables=0)
    if solved.bound > bound:
        bound, bound_method = solved.bound, "milp-dual-bound"
    method = "milp+local-search" if solved.support is not None else "heuristic"
    return problem.result(support, bound, method, bound_method)


def _run_highs(problem: _Problem, time_limit: float, *, integer: bool) -> _Solved:
    """Solve the RLT MILP (or its LP relaxation) with HiGHS; objective scaled to max |c| = 1."""
    c, A, lower, upper = _rlt_model(problem)
    scale = max(float(np.abs(c).max(initial=0.0)), 1e-300)
    n_x = len(problem.l)
    integrality = np.zeros(len(c))
    if integer:
        integrality[:n_x] = 1
    res = milp(
        c / scale,
        integrality=integrality,
        bounds=Bounds(0.0, 1.0),
        constraints=LinearConstraint(A, lower, upper),
        options={"time_limit": float(time_limit), "mip_rel_gap": 0.0, "disp": False},
    )
    optimal = res.status == 0
    if not integer:  # an LP's objective is a lower bound only when solved to optimality
        return _Solved(None, float(res.fun) * scale if optimal else -np.inf, optimal)
    bound = float(res.mip_dual_bound) * scale if res.mip_dual_bound is not None else -np.inf
    support = _rounded_support(problem, res.x[:n_x]) if res.x is not None else None
    return _Solved(support, bound if np.isfinite(bound) else -np.inf, optimal and support is not None)


def _rounded_support(problem: _Problem, x: np.ndarray) -> np.ndarray | None:
    """The chosen candidate per layer of a (near-)binary x; None if it breaks the budget."""
    o = problem.offsets
    support = np.array([o[i] + int(np.argmax(x[o[i] : o[i + 1]])) for i in range(len(o) - 1)])
    return support if within_budget(float(problem.cost[support].sum()), problem.budget) else None


def _rlt_model(problem: _Problem) -> tuple[np.ndarray, coo_matrix, np.ndarray, np.ndarray]:
    """Objective c and constraints lower ≤ A z ≤ upper over z = (x, y) (see the module docstring)."""
    n_x, n_layers = len(problem.l), len(problem.offsets) - 1
    c_parts = [problem.l + 0.5 * problem.diag]
    rows: list[np.ndarray] = []
    cols: list[np.ndarray] = []
    vals: list[np.ndarray] = []
    # one-hot: Σ_{a∈i} x_a = 1
    rows.append(problem.layer_of.astype(np.int64))
    cols.append(np.arange(n_x))
    vals.append(np.ones(n_x))
    # budget, scaled to O(1): Σ_a cost_a x_a ≤ budget
    cost_scale = max(abs(problem.budget), float(np.abs(problem.cost).max(initial=0.0)), 1e-300)
    rows.append(np.full(n_x, n_layers))
    cols.append(np.arange(n_x))
    vals.append(problem.cost / cost_scale)
    next_row, next_col = n_layers + 1, n_x
    for i, j in problem.pairs:
        oi, oj, ki, kj = problem.offsets[i], problem.offsets[j], problem.width(i), problem.width(j)
        c_parts.append(problem.G[oi : oi + ki, oj : oj + kj].ravel())
        y = next_col + np.arange(ki * kj).reshape(ki, kj)
        a_rows = next_row + np.repeat(np.arange(ki), kj)  # Σ_b y_ab − x_a = 0
        b_rows = next_row + ki + np.tile(np.arange(kj), ki)  # Σ_a y_ab − x_b = 0
        rows += [a_rows, b_rows, next_row + np.arange(ki), next_row + ki + np.arange(kj)]
        cols += [y.ravel(), y.ravel(), oi + np.arange(ki), oj + np.arange(kj)]
        vals += [np.ones(ki * kj), np.ones(ki * kj), -np.ones(ki), -np.ones(kj)]
        next_row += ki + kj
        next_col += ki * kj
    A = coo_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(next_row, next_col))
    lower = np.zeros(next_row)
    upper = np.zeros(next_row)
    lower[:n_layers] = upper[:n_layers] = 1.0
    lower[n_layers] = -np.inf
    upper[n_layers] = problem.budget / cost_scale + BUDGET_RTOL * max(1.0, abs(problem.budget)) / cost_scale
    return np.concatenate(c_parts), A, lower, upper


# ----- heuristic and bounds -----------------------------------------------------------------


def _solve_heuristic(problem: _Problem, time_limit: float, max_lp_variables: int) -> QuadraticResult:
    support = _best_local_search(problem, _heuristic_starts(problem), time.perf_counter() + time_limit)
    bound, bound_method = _best_bound(problem, support, time_limit, max_lp_variables)
    return problem.result(support, bound, "heuristic", bound_method)


def _best_bound(problem: _Problem, support: np.ndarray, time_limit: float, max_lp_variables: int) -> tuple[float, str]:
    """The largest of the valid lower bounds that fit the limits, and its name."""
    deadline = time.perf_counter() + time_limit
    bounds = {
        "row-minimum": _row_minimum_bound(problem),
        "convex-relaxation": _convex_relaxation_bound(problem, support, deadline),
    }
    if problem.n_products <= max_lp_variables:
        bounds["lp-relaxation"] = _run_highs(problem, max(deadline - time.perf_counter(), 1.0), integer=False).bound
    name = max(bounds, key=bounds.__getitem__)
    return bounds[name], name


def _heuristic_starts(problem: _Problem) -> list[np.ndarray]:
    """Greedy, Ω-optimal and separable-part-optimal configurations within the budget."""
    objective, kind, budget = problem.objective, problem.kind, problem.budget
    return [
        _greedy(problem),
        problem.support(solve_budget(objective, kind, budget).choice),
        problem.support(solve_budget(objective, kind, budget, values=problem.separable()).choice),
    ]


def _convex_relaxation_bound(problem: _Problem, start: np.ndarray, deadline: float, iterations: int = 500) -> float:
    """A valid lower bound from a convex relaxation, solved by Frank–Wolfe.

    For binary x, xᵀGx = xᵀ(G − D)x + Σ_a d_a x_a for any diagonal D = diag(d), so when
    G − D ⪰ 0 the function g(x) = (l + ½d)·x + ½ xᵀ(G − D)x equals ΔL on configurations and
    is convex. Over the relaxed polytope P = {x ≥ 0, Σ_{a∈i} x_a = 1, cost·x ≤ budget}, every
    Frank–Wolfe iterate x gives g(x) + min_{s∈P} ∇g(x)·(s − x) ≤ min_P g ≤ min ΔL (convexity).
    Two shifts d are tried (``_convex_shifts``), each with half the time; the best bound is kept.
    """
    shifts = _convex_shifts(problem.G)
    bounds = []
    for k, d in enumerate(shifts):
        share = (deadline - time.perf_counter()) / (len(shifts) - k)
        bounds.append(_frank_wolfe_bound(problem, d, start, time.perf_counter() + share, iterations))
    return max(bounds)


def _frank_wolfe_bound(problem: _Problem, d: np.ndarray, start: np.ndarray, deadline: float, iterations: int) -> float:
    """max over Frank–Wolfe iterates of g(x) + min_{s∈P} ∇g(x)·(s − x), for the shift d."""
    target = problem.value(start)
    Q = problem.G - np.diag(d)
    c = problem.l + 0.5 * d
    x = np.zeros(len(problem.l))
    x[start] = 1.0
    Qx = Q[:, start].sum(axis=1)
    best = -np.inf
    for iteration in range(iterations):
        gradient = c + Qx
        s, linear_bound = knapsack_lp(problem.objective, problem.kind, problem.budget, gradient)
        best = max(best, float(c @ x + 0.5 * x @ Qx) + linear_bound - float(gradient @ x))
        if best >= target - PROOF_RTOL * max(1.0, abs(target)):
            break  # the bound already closes the gap of the configuration it is for
        support = np.flatnonzero(s)  # s has at most N + 1 non-zeros: Q s is cheap
        Qd = Q[:, support] @ s[support] - Qx
        direction = s - x
        curvature, slope = float(direction @ Qd), float(gradient @ direction)
        if slope >= 0 or (iteration >= MIN_FRANK_WOLFE_ITERATIONS and time.perf_counter() > deadline):
            break
        step = min(1.0, -slope / curvature) if curvature > 0 else 1.0
        x += step * direction
        Qx += step * Qd
    return best


def knapsack_lp(objective: Objective, kind: str, budget: float, g: np.ndarray) -> tuple[np.ndarray, float]:
    """The LP min g·s over P = {s ≥ 0, Σ_{a∈i} s_a = 1, cost·s ≤ budget} (flat index).

    Returns a feasible minimiser s (to the bisection's precision) and a valid lower bound on
    the minimum, from Lagrangian duality: for any λ ≥ 0,
    φ(λ) = Σᵢ min_{a∈i} (g_a + λ cost_a) − λ·budget ≤ min_P g·s, and max_λ φ = the LP optimum.
    λ is found by bisection on the cost of the per-layer minimisers (non-increasing in λ);
    s mixes the minimisers at both ends so that its cost is exactly the budget.
    """
    cost, starts, layer_of = objective.flat_cost(kind), objective.offsets[:-1], objective.layer_of

    def minimisers(lam: float) -> np.ndarray:
        values = g + lam * cost
        is_min = values <= np.minimum.reduceat(values, starts)[layer_of]
        candidates = np.flatnonzero(is_min)
        _, first = np.unique(layer_of[candidates], return_index=True)
        return candidates[first]

    def phi(lam: float) -> float:
        return float(np.minimum.reduceat(g + lam * cost, starts).sum() - lam * budget)

    def one_hot(picked: np.ndarray) -> np.ndarray:
        s = np.zeros(len(g))
        s[picked] = 1.0
        return s

    low_pick = minimisers(0.0)
    if within_budget(float(cost[low_pick].sum()), budget):
        return one_hot(low_pick), phi(0.0)  # the budget does not bind
    lo, hi = 0.0, (np.ptp(g) + 1e-300) / (np.ptp(cost) + 1e-300)
    for _ in range(200):  # grow hi until its minimisers fit the budget
        if within_budget(float(cost[minimisers(hi)].sum()), budget):
            break
        lo, hi = hi, 2.0 * hi
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if within_budget(float(cost[minimisers(mid)].sum()), budget):
            hi = mid
        else:
            lo = mid
    over, fits = minimisers(lo), minimisers(hi)
    c_over, c_fits = float(cost[over].sum()), float(cost[fits].sum())
    theta = (budget - c_fits) / (c_over - c_fits) if c_over > c_fits else 0.0
    s = theta * one_hot(over) + (1.0 - theta) * one_hot(fits)
    return s, max(phi(lo), phi(hi))


def _convex_shifts(G: np.ndarray) -> list[np.ndarray]:
    """Diagonals d with G − diag(d) ⪰ 0: uniform and Jacobi-scaled.

    On the active (not all-zero, i.e. not fp32) rows A, with any positive scaling s and
    μ = λ_min(S⁻¹ G_AA S⁻¹): S⁻¹(G_AA − μS²)S⁻¹ ⪰ 0, so d_a = μ·s_a² works (d = 0 off A).
    s = 1 gives the uniform shift λ_min(G_AA); s_a = √|G_aa| scales the shift like G's diagonal,
    which differs by orders of magnitude between candidates (‖Δ‖ ∝ 2^-bits). Neither
    dominates the other, hence both.
    """
    active = np.flatnonzero(np.abs(G).max(axis=1) > 0)
    if len(active) == 0:
        return [np.zeros(len(G))]
    sub = G[np.ix_(active, active)]
    shifts = []
    for scale2 in (np.ones(len(active)), np.maximum(np.abs(np.diag(sub)), 1e-12 * float(np.abs(sub).max()))):
        inv = 1.0 / np.sqrt(scale2)
        normalized = sub * inv[:, None] * inv[None, :]
        mu = float(eigh(normalized, eigvals_only=True, subset_by_index=[0, 0])[0])
        mu -= 1e-9 * max(1.0, float(np.abs(normalized).max()))  # round-off margin keeps G − D ⪰ 0
        d = np.zeros(len(G))
        d[active] = mu * scale2
        shifts.append(d)
    return shifts


def _row_minimum_bound(problem: _Problem) -> float:
    """See ``row_minimum_bound``."""
    starts = problem.offsets[:-1]
    layer_min = np.minimum.reduceat(problem.G, starts, axis=1)  # (M, N): min_{b∈j} G_ab
    others = layer_min.sum(axis=1) - layer_min[np.arange(len(problem.l)), problem.layer_of]
    weights = problem.l + 0.5 * problem.diag + 0.5 * others
    return solve_budget(problem.objective, problem.kind, problem.budget, values=problem._per_layer(weights)).value


def _greedy(problem: _Problem) -> np.ndarray:
    """From the per-layer best of the separable part, repaired into the budget."""
    return _repair(problem, problem.support(tuple(int(np.argmin(v)) for v in problem.separable())))


def _repair(problem: _Problem, support: np.ndarray) -> np.ndarray:
    """Demote the layer with the least ΔL increase per unit of cost saved (cross terms
    included) until within the budget; in place."""
    Gx = problem.G[:, support].sum(axis=1)
    total = float(problem.cost[support].sum())
    while not within_budget(total, problem.budget):
        delta, dcost = _move_deltas(problem, support, Gx)
        saving = -dcost
        score = np.where(saving > 0, delta / np.where(saving > 0, saving, 1.0), np.inf)
        a = int(np.argmin(score))  # a cheaper candidate always exists while above the min cost
        total += _apply_move(problem, support, Gx, a)
    return support


def _move_deltas(problem: _Problem, support: np.ndarray, Gx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For every flat a: the change of ΔL and of cost when a's layer switches to a.

    With d = e_a − e_c (c the layer's current candidate): Δ = dᵀ(l + Gx) + ½ dᵀGd
    = l_a − l_c + (Gx)_a − (Gx)_c + ½ G_aa + ½ G_cc − G_ac.
    """
    current = support[problem.layer_of]
    a = np.arange(len(problem.l))
    delta = (
        problem.l
        - problem.l[current]
        + Gx
        - Gx[current]
        + 0.5 * problem.diag
        + 0.5 * problem.diag[current]
        - problem.G[a, current]
    )
    return delta, problem.cost - problem.cost[current]


def _apply_move(problem: _Problem, support: np.ndarray, Gx: np.ndarray, a: int) -> float:
    """Switch a's layer to a in place; returns the cost change."""
    i = problem.layer_of[a]
    old = support[i]
    Gx += problem.G[:, a] - problem.G[:, old]
    support[i] = a
    return float(problem.cost[a] - problem.cost[old])


def _best_local_search(problem: _Problem, starts: list[np.ndarray], deadline: float, kicks: int = KICKS) -> np.ndarray:
    """Local search from every start, then iterated local search from the best: ``kicks``
    times, move a few random layers to random candidates, repair into the budget, descend,
    and keep the result if it is better. Seeded, so results are reproducible."""
    finals = [_local_search(problem, s.copy(), deadline) for s in starts]
    best = min(finals, key=problem.value)
    best_value = problem.value(best)
    rng = np.random.default_rng(0)
    n_layers = len(problem.offsets) - 1
    for _ in range(kicks):
        if time.perf_counter() > deadline:
            break
        trial = best.copy()
        for i in rng.choice(n_layers, size=min(3, n_layers), replace=False):
            trial[i] = problem.offsets[i] + rng.integers(problem.width(i))
        trial = _local_search(problem, _repair(problem, trial), deadline)
        if problem.value(trial) < best_value:
            best, best_value = trial, problem.value(trial)
    return best


def _local_search(problem: _Problem, support: np.ndarray, deadline: float) -> np.ndarray:
    """Best-improvement descent: single-layer changes first, then pairs of changes, within
    the budget, until no move improves ΔL (or the deadline / move limit is reached)."""
    Gx = problem.G[:, support].sum(axis=1)
    total = float(problem.cost[support].sum())
    tolerance = 1e-12 * max(1.0, float(np.abs(problem.G).max(initial=0.0)), float(np.abs(problem.l).max(initial=0.0)))
    for _ in range(MAX_LOCAL_SEARCH_MOVES):
        if time.perf_counter() > deadline:
            break
        delta, dcost = _move_deltas(problem, support, Gx)
        feasible = total + dcost <= problem.budget + BUDGET_RTOL * max(1.0, abs(problem.budget))
        single = np.where(feasible, delta, np.inf)
        a = int(np.argmin(single))
        if single[a] < -tolerance:
            total += _apply_move(problem, support, Gx, a)
            continue
        pair = _best_pair(problem, support, total, delta, dcost)
        if pair is None or pair[2] >= -tolerance:
            break
        total += _apply_move(problem, support, Gx, pair[0])
        total += _apply_move(problem, support, Gx, pair[1])
    return support


def _best_pair(
    problem: _Problem, support: np.ndarray, total: float, delta: np.ndarray, dcost: np.ndarray
) -> tuple[int, int, float] | None:
    """The best feasible pair of changes in two different layers.

    Changing layer i to a and layer j to b: Δ = Δ_a + Δ_b + d_aᵀ G d_b with
    d_aᵀ G d_b = G_ab − G_a,c_j − G_c_i,b + G_c_i,c_j.
    """
    current = support[problem.layer_of]
    G = problem.G
    cross = G - G[:, current] - G[current, :] + G[np.ix_(current, current)]
    total_delta = delta[:, None] + delta[None, :] + cross
    same_layer = problem.layer_of[:, None] == problem.layer_of[None, :]
    over = total + dcost[:, None] + dcost[None, :] > problem.budget + BUDGET_RTOL * max(1.0, abs(problem.budget))
    total_delta[same_layer | over] = np.inf
    flat = int(np.argmin(total_delta))
    a, b = divmod(flat, len(delta))
    if not np.isfinite(total_delta[a, b]):
        return None
    return a, b, float(total_delta[a, b])
