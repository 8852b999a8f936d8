"""Expert placement planner: load ``[L, E]`` + cluster shape -> :class:`Placement`.

Pure functions, no I/O. The policy follows DeepSeek's EPLB and then improves on it:

(a) **replicate**: one copy per logical expert, then each of the ``P - E`` redundant
    slots goes to the expert with the highest load per copy (at most ``N`` copies
    per expert while that is possible, so copies can sit on distinct shards). The
    rule is also run on ``load ** alpha`` for a few ``alpha < 1`` (more copies for
    mid-hot experts, fewer oversized copies to pair up on one shard); every layer
    keeps the candidate whose packed max shard load is lowest. The load-blind copies
    of :func:`greedy_baseline` are one more candidate, so the plan never loses to it;
(b) **pack**: copies, heaviest first, go to the least loaded shard that has a free
    slot and does not hold that expert yet (equal slots per shard);
(c) **improve**: rounds of swaps between the most loaded shard and any other shard
    that lower the pair's maximum, until no swap helps;
(d) **move little**: given the current placement, new shard bins are mapped onto old
    shards by maximal overlap (greedy), and inside a shard copies already in place
    keep their slot.

Everything is vectorised across layers (loops run over slots / rounds, never over
layers). Loads are tokens per ``(layer, logical expert)``; a copy's load is its
expert's load divided evenly over the expert's copies.
"""

from __future__ import annotations

import torch

from moeyard.router_service.placement import Placement

__all__ = ["balancedness", "placement_shard_load", "min_balancedness", "plan_placement",
           "greedy_baseline", "count_moves"]

_MAX_IMPROVE_ROUNDS = 512
_ALPHAS = (1.0, 0.9, 0.8, 0.7)


# ---------------------------------------------------------------------------- metrics

def balancedness(load_per_shard: torch.Tensor) -> torch.Tensor:
    """``[L, N]`` tokens per shard -> ``[L]`` mean / max per layer (1.0 = perfect; 1.0 for an all-zero layer)."""
    x = torch.as_tensor(load_per_shard, dtype=torch.float64)
    if x.dim() != 2:
        raise ValueError(f"load per shard must be [L, N], got shape {list(x.shape)}")
    mx = x.max(dim=1).values
    mean = x.mean(dim=1)
    return torch.where(mx > 0, mean / torch.where(mx > 0, mx, torch.ones_like(mx)), torch.ones_like(mx))


def placement_shard_load(load, placement: Placement) -> torch.Tensor:
    """``load [L, E]`` tokens per logical expert -> ``[L, N]`` tokens per shard.

    Each expert's load is split evenly over its (reachable) copies; slots of
    excluded shards get nothing.
    """
    ld = _check_load(load)
    L, E = ld.shape
    if placement.num_layers != L or placement.num_experts > E:
        raise ValueError(f"load of shape {[L, E]} does not fit a placement of {placement.num_layers} layers "
                         f"and {placement.num_experts} experts")
    p2l = placement.phy2log
    cnt = torch.gather(placement.logcnt, 1, p2l).to(torch.float64)  # [L, P]
    per_copy = torch.gather(ld, 1, p2l) / cnt.clamp(min=1)
    live = torch.ones(placement.num_slots, dtype=torch.bool)
    sps = placement.slots_per_shard
    for s in placement.excluded_shards:
        live[s * sps:(s + 1) * sps] = False
    per_copy = torch.where(live & (cnt > 0), per_copy, torch.zeros_like(per_copy))
    return per_copy.view(L, placement.num_shards, sps).sum(dim=2)


def min_balancedness(load, placement: Placement) -> float:
    """Minimum over layers of :func:`balancedness` of ``placement`` under ``load [L, E]``."""
    return float(balancedness(placement_shard_load(load, placement)).min())


def count_moves(old: Placement, new: Placement) -> int:
    """Number of slots whose logical expert differs between ``old`` and ``new`` (same ``[L, P]``)."""
    if old.phy2log.shape != new.phy2log.shape:
        raise ValueError(f"placements differ in shape: {list(old.phy2log.shape)} vs {list(new.phy2log.shape)}")
    return int((old.phy2log != new.phy2log).sum())


# ---------------------------------------------------------------------------- planning

def _check_load(load) -> torch.Tensor:
    try:
        ld = torch.as_tensor(load, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"load must be a numeric [L, E] matrix: {e}") from None
    if ld.dim() != 2:
        raise ValueError(f"load must be [L, E] (layers x experts), got shape {list(ld.shape)}")
    if ld.shape[0] < 1 or ld.shape[1] < 1:
        raise ValueError(f"load must have at least one layer and one expert, got shape {list(ld.shape)}")
    if not bool(torch.isfinite(ld).all()):
        raise ValueError("load must be finite")
    if bool((ld < 0).any()):
        raise ValueError("load must not be negative")
    return ld


def _check_shape(E: int, num_shards: int, slots_per_shard: int) -> int:
    if num_shards < 1 or slots_per_shard < 1:
        raise ValueError(f"need at least one shard and one slot per shard, got {num_shards} x {slots_per_shard}")
    P = num_shards * slots_per_shard
    if P < E:
        raise ValueError(f"{num_shards} shards x {slots_per_shard} slots = {P} slots, fewer than experts ({E})")
    return P


def _replicate(ld: torch.Tensor, P: int, num_shards: int) -> torch.Tensor:
    """``[L, E]`` load -> ``[L, E]`` copies per expert (sum ``P``), highest load per copy first."""
    L, E = ld.shape
    cnt = torch.ones(L, E, dtype=torch.int64)
    rows = torch.arange(L)
    for _ in range(P - E):
        score = ld / cnt
        capped = cnt >= num_shards
        # keep copies on distinct shards while possible; fall back when every expert is capped
        score = torch.where(capped & ~capped.all(dim=1, keepdim=True), torch.full_like(score, -1.0), score)
        cnt[rows, score.argmax(dim=1)] += 1
    return cnt


def _round_robin_counts(L: int, E: int, P: int) -> torch.Tensor:
    """``[L, E]`` copies when slot ``p`` holds expert ``p % E`` (blind to load)."""
    return torch.bincount(torch.arange(P) % E, minlength=E).expand(L, E).contiguous()


def _copies(ld: torch.Tensor, cnt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Copies sorted heaviest first: ``(experts [L, P], weights [L, P])``."""
    L, E = ld.shape
    P = int(cnt[0].sum())
    w = ld / cnt
    order = torch.sort(w, dim=1, descending=True, stable=True).indices  # [L, E]
    cnt_sorted = torch.gather(cnt, 1, order)
    experts = torch.stack([torch.repeat_interleave(order[l], cnt_sorted[l]) for l in range(L)]) if L else \
        torch.zeros(0, P, dtype=torch.int64)
    return experts, torch.gather(w, 1, experts)


def _pack(experts: torch.Tensor, weights: torch.Tensor, E: int, N: int, S: int):
    """Greedy packing of copies (given heaviest first) onto ``N`` shards of ``S`` slots.

    Returns ``assign [L, N, S]`` experts, ``w [L, N, S]`` copy loads and ``has [L, N, E]`` counts.
    """
    L, P = experts.shape
    rows = torch.arange(L)
    shard_load = torch.zeros(L, N, dtype=torch.float64)
    fill = torch.zeros(L, N, dtype=torch.int64)
    has = torch.zeros(L, N, E, dtype=torch.int64)
    assign = torch.zeros(L, N, S, dtype=torch.int64)
    w = torch.zeros(L, N, S, dtype=torch.float64)
    inf = torch.tensor(float("inf"), dtype=torch.float64)
    for t in range(P):
        e, wt = experts[:, t], weights[:, t]
        free = fill < S
        ok = free & (has[rows, :, e] == 0)
        ok = torch.where(ok.any(dim=1, keepdim=True), ok, free)
        masked = torch.where(ok, shard_load, inf)
        # least loaded first, then the emptiest (ties: lowest index)
        tie = ok & (masked == masked.min(dim=1, keepdim=True).values)
        n = torch.where(tie, fill, torch.full_like(fill, S + 1)).argmin(dim=1)
        k = fill[rows, n]
        assign[rows, n, k] = e
        w[rows, n, k] = wt
        fill[rows, n] += 1
        shard_load[rows, n] += wt
        has[rows, n, e] += 1
    _repair_duplicates(assign, w, has)
    return assign, w, has


def _repair_duplicates(assign: torch.Tensor, w: torch.Tensor, has: torch.Tensor) -> None:
    """In place: where greedy packing put two copies of an expert on one shard, swap one of them with a
    copy on another shard when that creates no new duplicate (closest weight first). Rare; per layer."""
    L, N, S = assign.shape
    for layer in (has > 1).any(dim=2).any(dim=1).nonzero().flatten().tolist():
        a, wl, hl = assign[layer], w[layer], has[layer]
        while True:
            dup = (hl > 1).nonzero()
            if not len(dup):
                break
            n, e = int(dup[0, 0]), int(dup[0, 1])
            s = int((a[n] == e).nonzero()[0, 0])
            # candidates (m, t): e not on m, a[m, t] not on n
            ok = (hl[:, e] == 0)[:, None] & (torch.gather(hl[n].expand(N, -1), 1, a) == 0)
            if not bool(ok.any()):
                break  # unavoidable
            cost = torch.where(ok, (wl - wl[n, s]).abs(), torch.full_like(wl, float("inf")))
            m, t = divmod(int(cost.argmin()), S)
            f = int(a[m, t])
            a[n, s], a[m, t] = f, e
            wl[n, s], wl[m, t] = wl[m, t].clone(), wl[n, s].clone()
            hl[n, e] -= 1
            hl[n, f] += 1
            hl[m, f] -= 1
            hl[m, e] += 1


def _swap_pairs(assign, w, has, a, b) -> torch.Tensor:
    """In place: for disjoint shard pairs ``(a[l, m], b[l, m])`` (``a`` the heavier), apply the swap
    of one copy each that brings the pair's loads closest together, if it lowers the pair's max.
    ``a, b [L, M]``; returns ``[L]`` bool: some swap was made in that layer."""
    L, N, S = assign.shape
    M = a.shape[1]
    rows = torch.arange(L)[:, None].expand(L, M)
    load = w.sum(dim=2)
    la, lb = load[rows, a], load[rows, b]  # [L, M]
    wa, wb = w[rows, a], w[rows, b]  # [L, M, S]
    ea, eb = assign[rows, a], assign[rows, b]
    d = wa[:, :, :, None] - wb[:, :, None, :]  # [L, M, S_a, S_b]
    tol = 1e-12 * la.clamp(min=1.0)[:, :, None, None]
    new_max = torch.maximum(la[:, :, None, None] - d, lb[:, :, None, None] + d)
    ok = (d > tol) & (new_max < la[:, :, None, None] - tol)
    # no duplicate expert on either shard after the swap
    ea_on_b = torch.gather(has[rows, b], 2, ea) > 0  # [L, M, S_a]
    eb_on_a = torch.gather(has[rows, a], 2, eb) > 0  # [L, M, S_b]
    ok &= ~ea_on_b[:, :, :, None] & ~eb_on_a[:, :, None, :]
    score = torch.where(ok, new_max, torch.full_like(new_max, float("inf"))).view(L, M, S * S)
    best = score.argmin(dim=2)  # [L, M]
    go = torch.isfinite(score.gather(2, best[:, :, None]).squeeze(2))
    if not bool(go.any()):
        return go.any(dim=1)
    lr, bb = rows[go], best[go]
    _apply_swaps(assign, w, has, lr, a[go], bb // S, b[go], bb % S)
    return go.any(dim=1)


def _apply_swaps(assign: torch.Tensor, w: torch.Tensor, has: torch.Tensor, lr: torch.Tensor,
                 ga: torch.Tensor, i: torch.Tensor, gb: torch.Tensor, j: torch.Tensor) -> None:
    """In place: swap copy ``(lr, ga, i)`` with copy ``(lr, gb, j)`` (one swap per listed layer)
    in ``assign``/``w [L, N, S]`` and keep ``has [L, N, E]`` (copies per shard) in step."""
    e1, e2 = assign[lr, ga, i].clone(), assign[lr, gb, j].clone()
    w1, w2 = w[lr, ga, i].clone(), w[lr, gb, j].clone()
    assign[lr, ga, i], assign[lr, gb, j] = e2, e1
    w[lr, ga, i], w[lr, gb, j] = w2, w1
    has[lr, ga, e1] -= 1
    has[lr, ga, e2] += 1
    has[lr, gb, e2] -= 1
    has[lr, gb, e1] += 1


def _improve(assign: torch.Tensor, w: torch.Tensor, has: torch.Tensor, rounds: int = _MAX_IMPROVE_ROUNDS) -> None:
    """In place: local swaps between shards while they lower a pair's max.

    Phase 1 pairs the i-th heaviest shard with the i-th lightest (all pairs at once);
    phase 2 swaps the heaviest shard with whichever shard helps it most.
    """
    L, N, S = assign.shape
    if N < 2:
        return
    rows = torch.arange(L)
    half = N // 2
    for _ in range(rounds):
        order = torch.sort(w.sum(dim=2), dim=1, descending=True, stable=True).indices
        if not bool(_swap_pairs(assign, w, has, order[:, :half], order.flip(1)[:, :half]).any()):
            break
    for _ in range(rounds):
        load = w.sum(dim=2)
        h = load.argmax(dim=1)  # [L]
        lh = load[rows, h]
        wh, eh = w[rows, h], assign[rows, h]  # [L, S]
        d = wh[:, None, :, None] - w[:, :, None, :]  # [L, N, S_h, S_k]
        tol = 1e-12 * lh.clamp(min=1.0)[:, None, None, None]
        new_max = torch.maximum(lh[:, None, None, None] - d, load[:, :, None, None] + d)
        ok = (d > tol) & (new_max < lh[:, None, None, None] - tol)
        eh_on_k = torch.gather(has, 2, eh[:, None, :].expand(L, N, S)) > 0  # [L, N, S_h]
        ek_on_h = torch.gather(has[rows, h], 1, assign.reshape(L, N * S)).view(L, N, S) > 0  # [L, N, S_k]
        ok &= ~eh_on_k[:, :, :, None] & ~ek_on_h[:, :, None, :]
        ok[rows, h] = False
        score = torch.where(ok, new_max, torch.full_like(new_max, float("inf"))).view(L, -1)
        best = score.argmin(dim=1)
        go = torch.isfinite(score[rows, best])
        if not bool(go.any()):
            break
        k = best // (S * S)
        bb = best[go]
        _apply_swaps(assign, w, has, rows[go], h[go], (bb // S) % S, k[go], bb % S)


def _relabel(assign: torch.Tensor, current: Placement) -> torch.Tensor:
    """Permute shards and slots of ``assign [L, N, S]`` so that as many slots as possible keep their expert."""
    L, N, S = assign.shape
    old = current.phy2log.view(L, N, S)
    E = int(max(int(assign.max()), int(old.max()))) + 1
    rows = torch.arange(L)

    def counts(a):
        c = torch.zeros(L, N, E, dtype=torch.int64)
        c.scatter_add_(2, a, torch.ones_like(a))
        return c

    cn, co = counts(assign), counts(old)
    # overlap[l, j, k] = sum_e min(cn[l, j, e], co[l, k, e]) = sum_t [cn > t] . [co > t]
    overlap = torch.zeros(L, N, N, dtype=torch.float64)
    for t in range(S):
        a, b = (cn > t), (co > t)
        if not bool(a.any()) or not bool(b.any()):
            break
        overlap += torch.bmm(a.to(torch.float64), b.to(torch.float64).transpose(1, 2))
    # greedy maximal-overlap matching: new bin j -> old shard k
    target = torch.zeros(L, N, dtype=torch.int64)
    ov = overlap.clone()
    for _ in range(N):
        flat = ov.view(L, -1).argmax(dim=1)
        j, k = flat // N, flat % N
        target[rows, j] = k
        ov[rows, j, :] = -1.0
        ov[rows, :, k] = -1.0
    bins = torch.empty_like(assign)
    bins.scatter_(1, target[:, :, None].expand(L, N, S), assign)  # bins[l, k] = new contents of old shard k
    # inside a shard: copies already in place keep their slot, the rest fill the freed slots in order
    out = torch.full_like(old, -1)
    used = torch.zeros(L, N, S, dtype=torch.bool)
    for s in range(S):
        match = (bins == old[:, :, s:s + 1]) & ~used  # [L, N, S]
        hit = match.any(dim=2)
        first = match.to(torch.int8).argmax(dim=2)
        out[:, :, s] = torch.where(hit, old[:, :, s], out[:, :, s])
        used.scatter_(2, first[:, :, None], hit[:, :, None] | used.gather(2, first[:, :, None]))
    free_slots = torch.sort((out >= 0).to(torch.int8), dim=2, stable=True).indices  # unfilled slots first
    left_items = torch.sort(used.to(torch.int8), dim=2, stable=True).indices  # unused items first
    n_free = (out < 0).sum(dim=2, keepdim=True)
    pos = torch.arange(S).expand(L, N, S)
    items = torch.gather(bins, 2, left_items)
    fill_vals = torch.where(pos < n_free, items, torch.gather(out, 2, free_slots))
    out.scatter_(2, free_slots, fill_vals)
    return out


def plan_placement(load, num_shards: int, slots_per_shard: int, current: Placement | None = None,
                   epoch: int | None = None, keep_tolerance: float = 0.0) -> Placement:
    """Plan a placement for ``load [L, E]`` tokens per expert onto ``num_shards`` x ``slots_per_shard`` slots.

    Returns a :class:`Placement` with ``phy2log [L, P]``, ``P = N * S >= E`` (else
    ``ValueError``): every expert has at least one copy, every shard ``S`` slots.
    ``current`` (same ``L``, ``P`` and ``N``; otherwise ignored) is used to keep
    moves few: planning again from the same load with ``current`` = the plan moves
    nothing. ``epoch`` defaults to ``current.epoch + 1`` (0 without ``current``).
    ``keep_tolerance``: a layer keeps ``current``'s row unchanged when its max shard
    load there is within ``(1 + keep_tolerance)`` of the plan's (a move that wins
    almost nothing is not worth its bytes; load drift then moves few slots).
    """
    ld = _check_load(load)
    L, E = ld.shape
    N, S = int(num_shards), int(slots_per_shard)
    P = _check_shape(E, N, S)
    # candidates: replicate by load ** alpha (alpha = 1 is EPLB's rule; alpha < 1 spreads copies over
    # more mid-hot experts, which packs better under skew); all candidates run stacked along the layer
    # axis and each layer keeps its best (first on ties)
    # plus the load-blind round-robin copies of greedy_baseline, so the plan never does worse than it
    K = len(_ALPHAS) + 1
    stacked = torch.cat([ld ** a for a in _ALPHAS])  # [(K - 1) * L, E]
    cnt = torch.cat([_replicate(stacked, P, N), _round_robin_counts(L, E, P)])
    experts, weights = _copies(ld.repeat(K, 1), cnt)
    assign, w, has = _pack(experts, weights, E, N, S)
    _improve(assign, w, has)
    peak = w.sum(dim=2).max(dim=1).values.view(K, L)  # [K, L]
    best = peak.argmin(dim=0)  # [L]
    assign = assign.view(K, L, N, S)[best, torch.arange(L)]
    usable = (current is not None and current.num_layers == L and current.num_slots == P
              and current.num_shards == N)
    if usable:
        assign = _relabel(assign, current)
        cur_peak = placement_shard_load(ld, current).max(dim=1).values  # [L]
        new_peak = peak.min(dim=0).values
        keep = cur_peak <= new_peak * (1.0 + keep_tolerance)
        if bool(keep.any()):
            assign = assign.reshape(L, P).clone()
            assign[keep] = current.phy2log[keep]
    if epoch is None:
        epoch = current.epoch + 1 if current is not None else 0
    return Placement(assign.reshape(L, P).contiguous(), N, epoch)


def greedy_baseline(load, num_shards: int, slots_per_shard: int, epoch: int = 0) -> Placement:
    """Baseline for comparison: greedy packing without load-aware replication.

    One copy per expert; the ``P - E`` redundant slots hold copies of experts
    ``0, 1, 2, ...`` (round-robin, blind to load); copies are packed heaviest
    first onto the least loaded shard with a free slot. No swaps.
    """
    ld = _check_load(load)
    L, E = ld.shape
    N, S = int(num_shards), int(slots_per_shard)
    P = _check_shape(E, N, S)
    cnt = _round_robin_counts(L, E, P)
    experts, weights = _copies(ld, cnt)
    assign, _, _ = _pack(experts, weights, E, N, S)
    return Placement(assign.reshape(L, P).contiguous(), N, epoch)
