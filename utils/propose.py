"""The study's proposals: a bayes_opt optimizer, the constant liar for rounds of q points, random samplers (the
compartmental flag prior) and propose(), which picks the points of a round (see utils.study for how they are used).

Proposals are deterministic in (seed, first iteration of the round, round size, the registered data): the
optimizer's random state is re-seeded at every round, so that a resumed study proposes its rounds again exactly.

The compartmental network's option flags: the seed study drew all 11 uniformly, and such networks stay at chance
(README). Here random draws take the paper's flags, each flipped with probability flip_prob (FLIP_PROB; 0.5 is the
seed's uniform draw), the other parameters uniform over the seed's space; after the init_points the Gaussian process
picks the acquisition's maximum among N_CANDIDATES such draws (source "bo-prior"). flip_prob=None restores uniform
flags and bayes_opt's own suggestions.

How the loop treats awkward proposals (everything is logged, one line each in evals.jsonl):
- invalid CNN (utils.models.cnn_feature_shape raises; about 2 in 3 random CNN configurations are): never trained.
  Random proposals are drawn until valid. When bayes_opt's suggestion is invalid it is logged with status "invalid"
  and its reason, NOT registered with the optimizer (a chance score at an arithmetic constraint would only distort
  the Gaussian process), and replaced by the acquisition's maximum over random valid candidates. Invalid lines do
  not count in `iterations`; summarize() reports them as n_invalid.
- a suggestion that was already evaluated or proposed earlier in its round (integer and categorical parameters make
  that common) is replaced the same way (source "bo-valid (duplicate)"); no point is ever registered twice.
"""
import contextlib
import dataclasses
import io
import warnings
from collections.abc import Callable

import numpy as np
from bayes_opt import BayesianOptimization, acquisition

from utils.kinds import FLAG

N_CANDIDATES = 1000  # random valid candidates over which the acquisition is maximized (see propose)
MAX_RANDOM_DRAWS = 10_000  # random draws to find one valid configuration before giving up
KAPPA = 2.576        # UCB's exploration weight (mean + KAPPA std)
LIE = "min"          # constant liar: points proposed earlier in a round enter the GP at the lowest score so far


def make_optimizer(space, rng):
    """A bayes_opt BayesianOptimization over `space`, silent, with UCB, using (and re-seeded through) `rng`."""
    with warnings.catch_warnings():  # 3.x warns that integer/categorical parameters are "experimental"
        warnings.simplefilter("ignore")
        optimizer = BayesianOptimization(f=None, pbounds=space, acquisition_function=acquisition.UpperConfidenceBound(
            kappa=KAPPA), random_state=rng, verbose=0, allow_duplicate_points=True)
    optimizer.pbounds_ = dict(space)
    return optimizer


def with_lies(optimizer, pending):
    """The constant liar: a copy of the optimizer whose data also hold the points `pending` (proposed earlier in
    the round, not yet evaluated) at the lie (LIE: the lowest score so far), so that the GP sees no reward in
    proposing them or their surroundings again. The optimizer itself when nothing is pending. (bayes_opt 3.4's own
    acquisition.ConstantLiar copies the data space by zipping parameter names with encoded bounds, which breaks
    categorical parameters such as the compartmental flags; this does the same lie on a rebuilt optimizer.)"""
    if not pending:
        return optimizer
    space = optimizer.space
    lied = make_optimizer(optimizer.pbounds_, optimizer._random_state)
    for x, target in zip(space.params, space.target):
        register(lied, space.array_to_params(x), target)
    lie = {"min": np.min, "max": np.max, "mean": np.mean}[LIE](space.target)
    for p in pending:
        register(lied, p, lie)
    return lied


def _plain(params):
    """Optimizer params with numpy scalars turned into Python ones (JSON round-trips them exactly)."""
    return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in params.items()}


def register(optimizer, params, target):
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the duplicate notice prints; we never register duplicates anyway
        optimizer.register(params=params, target=float(target))


def _key(optimizer, params):
    return tuple(optimizer.space.params_to_array(params))


def _seen(optimizer, params):
    return optimizer.space.params_to_array(params) in optimizer.space


def uniform_sampler(optimizer):
    """Random points of the space, uniform as bayes_opt draws them (the seed study's draws)."""
    return lambda n: [_plain(p) for p in optimizer.random_sample(n)]


def flag_sampler(optimizer, rng, paper_flags, flip_prob):
    """Random points of the compartmental space whose option flags are the paper's (paper_flags: flag -> "on" /
    "off"), each flipped with probability flip_prob (0: always the paper's, 0.5: uniform like the seed study's
    draws, 1: all flipped); every other parameter uniform."""
    def sample(n):
        points = []
        for p in optimizer.random_sample(n):
            p = _plain(p)
            for flag, value in paper_flags.items():
                p[flag] = FLAG[1 - FLAG.index(value)] if rng.random_sample() < flip_prob else value
            points.append(p)
        return points
    return sample


def _random_valid(optimizer, is_valid, n=1, exclude=(), sample=None):
    """`n` random valid points, unseen and not in `exclude` (keys, see _key), fewer if the space has no more, and
    the number of draws thrown away."""
    sample = sample or uniform_sampler(optimizer)
    found, drawn, keys = [], 0, set(exclude)
    while len(found) < n and drawn < MAX_RANDOM_DRAWS:
        for params in sample(min(max(2 * n, 16), MAX_RANDOM_DRAWS - drawn)):
            drawn += 1
            key = _key(optimizer, params)
            if key not in keys and not _seen(optimizer, params) and is_valid(params):
                found.append(params)
                keys.add(key)
                if len(found) == n:
                    break
    if not found:
        raise RuntimeError(f"no valid unseen configuration in {MAX_RANDOM_DRAWS} random draws; the space is too "
                           f"small or (almost) everywhere invalid")
    return found, drawn - len(found)


def _predict(optimizer, candidates, pending):
    """GP mean and std at the candidates, the round's pending points entered at the lie (with_lies)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return with_lies(optimizer, pending).predict(candidates, return_std=True, fit_gp=True)


def _best_valid_candidate(optimizer, is_valid, pending=(), sample=None):
    """The acquisition (UCB: mean + KAPPA std of the GP) maximized over N_CANDIDATES random valid unseen points that
    are not pending: the suggestion when the library's own is invalid or already evaluated, and always where a prior
    draws the candidates (the compartmental flags)."""
    exclude = {_key(optimizer, p) for p in pending}
    candidates, rejected = _random_valid(optimizer, is_valid, N_CANDIDATES, exclude, sample)
    mean, std = _predict(optimizer, candidates, list(pending))
    ucb = np.asarray(mean) + KAPPA * np.asarray(std)
    return candidates[int(np.argmax(ucb))], rejected


@dataclasses.dataclass(frozen=True)
class Search:
    """What every round of a study proposes from: its `seed`, its `init_points` random evaluations, check(params) ->
    None when valid, else the reason; `start`: evaluation 0 (None: random); `sample`: the random draws (None:
    uniform; flag_sampler for the compartmental network, whose GP proposals are then the acquisition's maximum over
    such draws)."""
    seed: int
    init_points: int
    check: Callable
    start: dict | None = None
    sample: Callable | None = None


def propose(optimizer, rng, search, iteration, size=1):
    """The points of the round of `size` evaluations that starts at evaluation number `iteration` of the `search`
    (a Search): a list of (params, source, rejected, invalid), deterministic in (seed, iteration, size, the
    registered data).

    source: "start" (evaluation 0 is `start` when given, valid and not yet evaluated), "random" (the first
    init_points evaluations), "bo" (bayes_opt's own suggestion, the round's earlier points lied in: with_lies),
    "bo-prior" (the acquisition's maximum over draws of `sample`), "bo-valid (invalid)" or "bo-valid (duplicate)"
    (bayes_opt's suggestion was invalid or already evaluated or proposed, so the acquisition was maximized over
    random valid candidates instead). rejected: random draws thrown away as invalid or seen. invalid: (params,
    reason) of an invalid suggestion, for the log, else None."""
    rng.seed((search.seed * 1_000_003 + iteration) % 2**32)
    picked = []
    for it in range(iteration, iteration + size):
        pending = [p[0] for p in picked]
        picked.append(_propose_one(optimizer, search, it, pending))
    return picked


def _propose_one(optimizer, search, iteration, pending):
    check, start, sample = search.check, search.start, search.sample

    def is_valid(p):
        return check(p) is None

    keys = {_key(optimizer, p) for p in pending}
    if iteration == 0 and start is not None and is_valid(start) and not _seen(optimizer, start):
        return dict(start), "start", 0, None
    if iteration < search.init_points or len(optimizer.space) == 0:
        (params,), rejected = _random_valid(optimizer, is_valid, exclude=keys, sample=sample)
        return params, "random", rejected, None
    if sample is not None:
        params, rejected = _best_valid_candidate(optimizer, is_valid, pending, sample)
        return params, "bo-prior", rejected, None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        params = _plain(with_lies(optimizer, pending).suggest())
    reason = check(params)
    if reason is None and not _seen(optimizer, params) and _key(optimizer, params) not in keys:
        return params, "bo", 0, None
    candidate, rejected = _best_valid_candidate(optimizer, is_valid, pending)
    if reason is None:
        return candidate, "bo-valid (duplicate)", rejected, None
    return candidate, "bo-valid (invalid)", rejected, (params, reason)
