"""The search objective: per-layer candidates, their predicted loss terms and additive costs.

Layers i = 1..N each have candidates b (``fp32``, ``w8a8``, ``w4a8``, ``w8``, ``w4``). All
(layer, candidate) pairs are laid out one after the other in a *flat index* a = offset[i] + b,
of length M = Σᵢ Kᵢ. A configuration c picks one candidate per layer; as a 0/1 vector x over
the flat index it is one-hot per layer.

Two predicted loss changes are held (DESIGN.md):

- diagonal (HAWQ-V2):   Ω(c)  = Σᵢ Ωᵢ(cᵢ)
- inter-layer:          ΔL(c) = Σᵢ lᵢ(cᵢ) + ½ Σᵢ Σⱼ G[(i,cᵢ),(j,cⱼ)] = l·x + ½ xᵀGx

with lᵢ(b) = gᵢ·Δᵢᵇ and G symmetric. ``fp32`` has Δ = 0, so its l, Ω and G row are zero.
Candidates that share weight bits (``w8a8`` and ``w8``) share Δ; the caller duplicates their
entries. Costs (size bytes, BOPS, a latency proxy, ...) are additive: cost(c) = Σᵢ sᵢ(cᵢ).

Configurations are accepted either as a mapping layer name -> candidate name (what the
exporter and the measurement use) or as a *choice*: a sequence of candidate indices, one per
layer (what the searches use internally).

Layers may offer different candidates: that is the one mechanism by which a layer is kept out of
quantization (``planner.exclude``: an excluded layer offers ``fp32`` alone), so every search, which
only ever picks among a layer's own candidates, respects it. ``uniform_within`` is the one rule for
"every layer at b" when some layers do not offer b.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import ArrayLike

FORMAT = "mpq.objective/1"
FP32 = "fp32"
# G estimated with Hessian-vector products is symmetric only up to round-off; we accept that
# much relative asymmetry and store the symmetrized (G + Gᵀ)/2.
SYMMETRY_RTOL = 1e-3
# Budgets are compared with a relative slack so that sums of the same numbers taken in a
# different order (or by a solver) do not flip feasibility.
BUDGET_RTOL = 1e-9
MAX_FLAT_CANDIDATES = 8192  # bounds the M×M matrix G (8192² float64 = 512 MiB)

Choice = tuple[int, ...]
Configuration = Mapping[str, str] | Sequence[int]
Table = tuple[np.ndarray, ...]  # one 1-D float array per layer, one entry per candidate
TableLike = Sequence[ArrayLike] | np.ndarray  # what the constructor takes for a table: numbers per layer


def uniform_within(offered: Mapping[str, Sequence[str]], candidate: str) -> dict[str, str]:
    """Every layer at ``candidate`` where it offers it; a layer that does not (an excluded layer offers
    fp32 alone) stays at fp32, or at its first candidate when it has no fp32 either."""
    return {
        layer: candidate if candidate in names else FP32 if FP32 in names else names[0]
        for layer, names in offered.items()
    }


def within_budget(cost: float, budget: float) -> bool:
    """cost ≤ budget, up to a relative slack of ``BUDGET_RTOL``."""
    return cost <= budget + BUDGET_RTOL * max(1.0, abs(budget))


def _frozen_array(values: Any, what: str) -> np.ndarray:
    try:
        array = np.array(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be numbers") from None
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{what} has non-finite values (nan or inf)")
    array.setflags(write=False)
    return array


def _table(values: Any, counts: Sequence[int], what: str) -> Table:
    """Per-layer arrays with exactly ``counts[i]`` entries for layer i."""
    if isinstance(values, np.ndarray) and values.ndim == 1:
        raise ValueError(f"{what} must be given per layer (a list of per-candidate arrays)")
    try:
        rows = list(values)
    except TypeError:
        raise ValueError(f"{what} must be a list with one per-candidate list per layer") from None
    if len(rows) != len(counts):
        raise ValueError(f"{what} has {len(rows)} layers, expected {len(counts)}")
    table = []
    for i, (row, count) in enumerate(zip(rows, counts)):
        array = _frozen_array(row, f"{what}[layer {i}]")
        if array.shape != (count,):
            raise ValueError(f"{what}[layer {i}] has shape {array.shape}, expected ({count},)")
        table.append(array)
    return tuple(table)


@dataclass(frozen=True, eq=False)
class Objective:
    """Everything a search needs, as plain numbers.

    ``omega`` and each ``costs[kind]`` are per-layer per-candidate tables; ``linear`` (l) is too
    and defaults to zero; ``G`` is the M×M matrix over the flat index and defaults to zero.
    The constructor takes any numbers (lists, arrays) and None for zeros; the fields hold them
    checked, as read-only float arrays.
    """

    layers: tuple[str, ...]
    candidates: tuple[tuple[str, ...], ...]
    omega: Table
    costs: Mapping[str, Table]
    # None (the constructor's default) stands for zeros: __post_init__ stores them.
    linear: Table = None  # type: ignore[assignment]
    G: np.ndarray = field(default=None, repr=False)  # type: ignore[arg-type]

    if TYPE_CHECKING:  # what the constructor accepts; __post_init__ normalises it to the fields' types

        def __init__(
            self,
            layers: Sequence[str],
            candidates: Sequence[Sequence[str]],
            omega: TableLike,
            costs: Mapping[str, TableLike],
            linear: TableLike | None = None,
            G: ArrayLike | None = None,
        ) -> None: ...

    def __post_init__(self) -> None:
        layers = tuple(str(name) for name in self.layers)
        candidates = tuple(tuple(str(name) for name in names) for names in self.candidates)
        _check_names(layers, candidates)
        counts = [len(names) for names in candidates]
        size = sum(counts)
        if size > MAX_FLAT_CANDIDATES:
            raise ValueError(f"{size} (layer, candidate) pairs exceed the limit {MAX_FLAT_CANDIDATES}")
        set_ = object.__setattr__  # frozen dataclass: normalise fields once, here
        set_(self, "layers", layers)
        set_(self, "candidates", candidates)
        set_(self, "omega", _table(self.omega, counts, "omega"))
        linear = self.linear if self.linear is not None else [np.zeros(k) for k in counts]
        set_(self, "linear", _table(linear, counts, "linear"))
        if not self.costs:
            raise ValueError("costs needs at least one kind (e.g. 'size')")
        costs = {str(kind): _table(table, counts, f"costs[{kind!r}]") for kind, table in self.costs.items()}
        set_(self, "costs", costs)  # a plain dict (picklable, for worker processes); never mutated
        set_(self, "G", _symmetric(self.G, size))
        self._check_fp32_zero()

    # ----- the flat index -------------------------------------------------------------------

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def size(self) -> int:
        """M, the length of the flat (layer, candidate) index."""
        return int(self.offsets[-1])

    @cached_property
    def offsets(self) -> np.ndarray:
        """offsets[i] is the flat index of layer i's first candidate; offsets[N] = M."""
        return np.concatenate([[0], np.cumsum([len(names) for names in self.candidates])]).astype(np.int64)

    @cached_property
    def layer_of(self) -> np.ndarray:
        """The layer of each flat index."""
        return np.repeat(np.arange(self.n_layers), np.diff(self.offsets))

    def index(self, layer: str | int, candidate: str | int) -> int:
        """Flat index of (layer, candidate); both may be given by name or position."""
        i = self.layers.index(layer) if isinstance(layer, str) else int(layer)
        b = self.candidates[i].index(candidate) if isinstance(candidate, str) else int(candidate)
        if not 0 <= b < len(self.candidates[i]):
            raise IndexError(f"layer {self.layers[i]!r} has no candidate {candidate!r}")
        return int(self.offsets[i]) + b

    def block(self, i: int, j: int) -> np.ndarray:
        """G[(i, ·), (j, ·)], the Kᵢ×Kⱼ block of G between layers i and j."""
        o = self.offsets
        return self.G[o[i] : o[i + 1], o[j] : o[j + 1]]

    @cached_property
    def flat_linear(self) -> np.ndarray:
        return np.concatenate(self.linear)

    @cached_property
    def flat_omega(self) -> np.ndarray:
        return np.concatenate(self.omega)

    def flat_cost(self, kind: str) -> np.ndarray:
        return np.concatenate(self.cost_table(kind))

    def cost_table(self, kind: str) -> Table:
        if kind not in self.costs:
            raise KeyError(f"unknown cost kind {kind!r}; this objective has {sorted(self.costs)}")
        return self.costs[kind]

    # ----- configurations -------------------------------------------------------------------

    def choice_of(self, configuration: Configuration) -> Choice:
        """The candidate index per layer of a configuration (a mapping or a choice)."""
        if isinstance(configuration, Mapping):
            missing = [name for name in self.layers if name not in configuration]
            extra = [name for name in configuration if name not in self.layers]
            if missing or extra:
                raise ValueError(f"configuration: missing layers {missing[:5]}, unknown layers {extra[:5]}")
            picks = []
            for i, name in enumerate(self.layers):
                if configuration[name] not in self.candidates[i]:
                    raise ValueError(
                        f"layer {name!r} has no candidate {configuration[name]!r}; it has {self.candidates[i]}"
                    )
                picks.append(self.candidates[i].index(configuration[name]))
            return tuple(picks)
        choice = tuple(int(b) for b in configuration)
        if len(choice) != self.n_layers:
            raise ValueError(f"a choice needs {self.n_layers} entries, got {len(choice)}")
        for i, b in enumerate(choice):
            if not 0 <= b < len(self.candidates[i]):
                raise ValueError(f"layer {self.layers[i]!r} has no candidate index {b}")
        return choice

    def configuration(self, choice: Configuration) -> dict[str, str]:
        """The mapping layer name -> candidate name."""
        choice = self.choice_of(choice)
        return {name: self.candidates[i][b] for i, (name, b) in enumerate(zip(self.layers, choice))}

    def uniform(self, candidate: str) -> dict[str, str]:
        """Every layer at ``candidate`` where it offers it, else at fp32 (``uniform_within``)."""
        return uniform_within(dict(zip(self.layers, self.candidates)), candidate)

    def flat_indices(self, configuration: Configuration) -> np.ndarray:
        """The flat index of each layer's chosen candidate (the support of x)."""
        return self.offsets[:-1] + np.asarray(self.choice_of(configuration), dtype=np.int64)

    def evaluate(self, configuration: Configuration) -> tuple[float, float]:
        """(Ω(c), ΔL(c)): the diagonal and the inter-layer predicted loss change."""
        support = self.flat_indices(configuration)
        diagonal = float(self.flat_omega[support].sum())
        interlayer = float(self.flat_linear[support].sum() + 0.5 * self.G[np.ix_(support, support)].sum())
        return diagonal, interlayer

    def cost(self, configuration: Configuration, kind: str) -> float:
        """Σᵢ sᵢ(cᵢ) for the cost ``kind``."""
        return float(self.flat_cost(kind)[self.flat_indices(configuration)].sum())

    # ----- serialization --------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data (lists of floats); ``from_dict`` inverts it exactly."""
        return {
            "format": FORMAT,
            "layers": list(self.layers),
            "candidates": [list(names) for names in self.candidates],
            "omega": [row.tolist() for row in self.omega],
            "linear": [row.tolist() for row in self.linear],
            "G": self.G.tolist(),
            "costs": {kind: [row.tolist() for row in table] for kind, table in self.costs.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Objective:
        """Validate and build from ``to_dict`` output (e.g. parsed JSON)."""
        if not isinstance(data, Mapping):
            raise ValueError("an objective must be a JSON object")
        if data.get("format") != FORMAT:
            raise ValueError(f"unknown objective format {data.get('format')!r}, expected {FORMAT!r}")
        missing = [key for key in ("layers", "candidates", "omega", "costs") if key not in data]
        if missing:
            raise ValueError(f"objective is missing {missing}")
        if not isinstance(data["costs"], Mapping):
            raise ValueError("costs must map a cost kind to a per-layer table")
        return cls(
            layers=tuple(data["layers"]),
            candidates=tuple(tuple(names) for names in data["candidates"]),
            omega=data["omega"],
            costs=dict(data["costs"]),
            linear=data.get("linear"),
            G=data.get("G"),
        )

    @classmethod
    def from_weight_bits(
        cls,
        layers: Sequence[str],
        candidates: Sequence[Sequence[str]],
        weight_bits: Mapping[str, int | None],
        labels: Sequence[tuple[str, int]],
        *,
        omega: Sequence[float],
        linear: Sequence[float],
        G: Any,
        costs: Mapping[str, Any],
    ) -> Objective:
        """Expand terms indexed by (layer, weight bits) to the per-candidate objective.

        Δ depends on the weight bits only, so candidate b of layer i takes the entries of label
        (i, weight_bits[b]); a candidate with ``None`` bits (fp32) gets zeros. ``labels`` orders
        ``omega``, ``linear`` and the rows/columns of ``G`` (as sensitivity's inter-layer terms
        do); ``costs`` are already per candidate.
        """
        position = {(str(name), int(bits)): k for k, (name, bits) in enumerate(labels)}
        matrix = np.asarray(G, dtype=np.float64)
        omega_, linear_ = np.asarray(omega, dtype=np.float64), np.asarray(linear, dtype=np.float64)
        if (
            matrix.shape != (len(labels), len(labels))
            or omega_.shape != (len(labels),)
            or linear_.shape != omega_.shape
        ):
            raise ValueError(f"omega, linear and G must have {len(labels)} entries per axis, one per label")
        source: list[int] = []  # label index per flat (layer, candidate); -1 for fp32
        for layer, names in zip(layers, candidates):
            for name in names:
                if name not in weight_bits:
                    raise ValueError(f"no weight bits given for candidate {name!r}")
                bits = weight_bits[name]
                if bits is not None and (layer, bits) not in position:
                    raise ValueError(f"no terms for layer {layer!r} at {bits} weight bits (candidate {name!r})")
                source.append(-1 if bits is None else position[(layer, bits)])
        index = np.array(source, dtype=np.int64)
        quantized = index >= 0
        flat_omega, flat_linear = np.zeros(len(index)), np.zeros(len(index))
        flat_omega[quantized], flat_linear[quantized] = omega_[index[quantized]], linear_[index[quantized]]
        flat_G = np.zeros((len(index), len(index)))
        flat_G[np.ix_(quantized, quantized)] = matrix[np.ix_(index[quantized], index[quantized])]
        splits = np.cumsum([len(names) for names in candidates])[:-1]
        return cls(
            layers=tuple(layers),
            candidates=tuple(tuple(names) for names in candidates),
            omega=np.split(flat_omega, splits),
            costs=costs,
            linear=np.split(flat_linear, splits),
            G=flat_G,
        )

    def equals(self, other: Objective) -> bool:
        """Same names and exactly the same numbers."""
        return self.to_dict() == other.to_dict()

    # ----- validation helpers ---------------------------------------------------------------

    def _check_fp32_zero(self) -> None:
        """fp32 has Δ = 0, so l, Ω and G must vanish there; anything else is a caller bug."""
        scale = max(1.0, float(np.abs(self.G).max(initial=0.0)))
        for i, names in enumerate(self.candidates):
            if FP32 not in names:
                continue
            a = self.index(i, FP32)
            for what, value in (("omega", self.flat_omega[a]), ("linear", self.flat_linear[a])):
                if abs(value) > 1e-12:
                    raise ValueError(f"layer {self.layers[i]!r}: {what} of fp32 must be 0 (Δ = 0), got {value}")
            if np.abs(self.G[a]).max() > 1e-12 * scale:
                raise ValueError(f"layer {self.layers[i]!r}: the G row of fp32 must be 0 (Δ = 0)")


def _check_names(layers: tuple[str, ...], candidates: tuple[tuple[str, ...], ...]) -> None:
    if not layers:
        raise ValueError("an objective needs at least one layer")
    if len(set(layers)) != len(layers):
        raise ValueError("layer names must be unique")
    if len(candidates) != len(layers):
        raise ValueError(f"candidates are given for {len(candidates)} layers, expected {len(layers)}")
    for name, names in zip(layers, candidates):
        if not names:
            raise ValueError(f"layer {name!r} has no candidates")
        if len(set(names)) != len(names):
            raise ValueError(f"layer {name!r} has duplicate candidate names {names}")


def _symmetric(G: Any, size: int) -> np.ndarray:
    """Validated, symmetrized, read-only M×M G (zeros when not given)."""
    if G is None:
        matrix = np.zeros((size, size))
    else:
        matrix = np.array(G, dtype=np.float64)
        if matrix.shape != (size, size):
            raise ValueError(f"G has shape {matrix.shape}, expected ({size}, {size}) over the flat index")
        if not np.all(np.isfinite(matrix)):
            raise ValueError("G has non-finite values (nan or inf)")
        asymmetry = float(np.abs(matrix - matrix.T).max(initial=0.0))
        scale = float(np.abs(matrix).max(initial=0.0))
        if asymmetry > SYMMETRY_RTOL * scale:
            raise ValueError(
                f"G is not symmetric: max |G - Gᵀ| = {asymmetry:.3g} exceeds {SYMMETRY_RTOL} × max |G| = "
                f"{SYMMETRY_RTOL * scale:.3g}; symmetrize it ((G + Gᵀ)/2) if the asymmetry is estimation noise"
            )
        matrix = 0.5 * (matrix + matrix.T)
    matrix.setflags(write=False)
    return matrix


def synthetic_objective(
    n_layers: int,
    candidates: Sequence[str] = ("fp32", "w8a8", "w4a8", "w8", "w4"),
    *,
    seed: int,
    coupling: float = 0.5,
    rank: int = 8,
    negative_fraction: float = 0.0,
    negative_weight: float = 0.3,
    integer_costs: bool = True,
) -> Objective:
    """A random but plausible objective for tests and benchmarks.

    Layer i has nᵢ weights and an average trace tᵢ; its perturbation shrinks with the weight
    bits, eᵃ = 16·‖Δ‖ ∝ 2^(4−bits) (shared by candidates with the same weight bits), and
    Ωᵢ(b) = tᵢ·(eᵇ)². G = blockdiag(Lᵢ) + V S Vᵀ: the diagonal blocks
    Lᵢ[a, b] = tᵢ eᵃ eᵇ ρ(a, b) (ρ = 1 for the same weight bits, ½ otherwise) and a rank-``rank``
    inter-layer part of relative weight ``coupling``, whose S has a ``negative_fraction`` of
    entries −``negative_weight`` (the rest +1), making G indefinite when non-zero. l is small
    (a trained model's gradient). Costs: ``size`` (bytes = nᵢ·wbits/8) and ``bops``
    (nᵢ·wbits·abits), integers unless ``integer_costs`` is False (then jittered by ±10 %).
    """
    rng = np.random.default_rng(seed)
    bits = {"fp32": (32, 32), "w8a8": (8, 8), "w4a8": (4, 8), "w8": (8, 32), "w4": (4, 32), "w2": (2, 32)}
    unknown = [name for name in candidates if name not in bits]
    if unknown:
        raise ValueError(f"synthetic_objective knows no candidate {unknown}")
    k = len(candidates)
    params = rng.integers(1_000, 100_000, size=n_layers)
    trace = rng.lognormal(0.0, 1.0, size=n_layers)
    directions = {w: rng.normal(size=(n_layers, rank)) / np.sqrt(rank) for w in (2, 4, 8)}
    wbits = np.array([bits[name][0] for name in candidates])
    abits = np.array([bits[name][1] for name in candidates])
    e = np.where(wbits == 32, 0.0, 2.0 ** (4.0 - wbits))  # 16·‖Δ‖ per candidate
    rho = np.where(wbits[:, None] == wbits[None, :], 1.0, 0.5)
    G = np.zeros((n_layers * k, n_layers * k))
    V = np.zeros((n_layers * k, rank))
    for i in range(n_layers):
        block = slice(i * k, (i + 1) * k)
        G[block, block] = trace[i] * np.outer(e, e) * rho
        V[block] = np.array([e[b] * directions[w][i] if e[b] else np.zeros(rank) for b, w in enumerate(wbits)])
        V[block] *= np.sqrt(coupling * trace[i])
    S = np.where(rng.random(rank) < negative_fraction, -negative_weight, 1.0)
    G += (V * S) @ V.T
    omega = [trace[i] * e**2 for i in range(n_layers)]
    linear = [rng.normal(0.0, 0.02, size=k) * e for _ in range(n_layers)]
    size = [params[i] * wbits / 8 for i in range(n_layers)]
    bops = [params[i] * wbits * abits for i in range(n_layers)]
    if not integer_costs:
        size = [row * rng.uniform(0.9, 1.1, size=k) for row in size]
        bops = [row * rng.uniform(0.9, 1.1, size=k) for row in bops]
    return Objective(
        layers=tuple(f"layer{i}.weight" for i in range(n_layers)),
        candidates=tuple(tuple(candidates) for _ in range(n_layers)),
        omega=omega,
        costs={"size": size, "bops": bops},
        linear=linear,
        G=G,
    )
