"""The one mask builder: who sees whom, for every granularity, packing and leakage variant."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from llm_features.finetune.masks import (
    LEAKAGE_VARIANTS,
    allowed_attention,
    attention_bias,
    interaction_distance,
)
from llm_features.finetune.packing import (
    BehaviorPacker,
    TokenPacker,
    assign_rows,
    balance_rows,
    UserHistories,
    batch_indices,
    make_blocks,
)


def random_histories(seed: int, users: int = 4, max_len: int = 25, tie_rate: float = 0.4) -> UserHistories:
    """Random users with many equal timestamps; splits by a global time cut."""
    rng = np.random.default_rng(seed)
    user, time = [], []
    for u in range(users):
        m = int(rng.integers(1, max_len))
        steps = np.where(rng.random(m) < tie_rate, 0, rng.integers(1, 5, m))
        user += [u] * m
        time += list(np.cumsum(steps) + int(rng.integers(0, 3)))
    user, time = np.array(user), np.array(time)
    perm = rng.permutation(len(user))  # any input order
    cut1, cut2 = np.quantile(time, [0.6, 0.8])
    split = np.where(time < cut1, 0, np.where(time < cut2, 1, 2))
    label = rng.integers(0, 2, len(user))
    return UserHistories.from_arrays(
        user[perm], time[perm], rng.integers(0, 7, len(user))[perm], rng.integers(0, 5, len(user))[perm],
        label[perm], label[perm], split[perm],
    )


def window(hist: UserHistories, j: int, n: int) -> set[int]:
    """Brute force: the n most recent rows of j's user with a strictly earlier timestamp."""
    same_user = np.flatnonzero(hist.user_start == hist.user_start[j])
    earlier = [h for h in same_user if hist.time[h] < hist.time[j]]
    return set(earlier[max(0, len(earlier) - n):] if n else [])


def behavior_batch(hist, k, n, targets=None):
    targets = np.ones(len(hist), bool) if targets is None else targets
    blocks = make_blocks(hist, targets, k, n)
    packer = BehaviorPacker(hist, torch.randn(7, 4), torch.randn(5, 4))
    return blocks, packer(blocks)


def tokens_of(layout):
    """Per packed sequence: (batch row, [(token index, history row, is_query)] of its valid tokens)."""
    out = []
    for b in range(layout.shape[0]):
        for seg in layout.segment[b][layout.valid[b]].unique().tolist():
            idx = torch.nonzero(layout.valid[b] & (layout.segment[b] == seg)).flatten().tolist()
            out.append((b, [(p, int(layout.interaction[b, p]), bool(layout.is_query[b, p])) for p in idx]))
    return out


@pytest.mark.parametrize("leakage", LEAKAGE_VARIANTS)
@pytest.mark.parametrize("k", [1, 3, 8])
@pytest.mark.parametrize("seed", range(4))
def test_behavior_mask_matches_brute_force(seed, k, leakage):
    n = 4
    hist = random_histories(seed)
    blocks, batch = behavior_batch(hist, k, n)
    allowed = allowed_attention(batch.layout, n, leakage)
    seqs = tokens_of(batch.layout)
    assert len(seqs) == len(blocks)
    for b, toks in seqs:
        mine = torch.zeros(batch.layout.shape[1], dtype=torch.bool)
        mine[[p for p, _, _ in toks]] = True
        for p, _, _ in toks:  # nothing of another sequence sharing the row
            assert not allowed[b, p][~mine].any()
        present = {r for _, r, q in toks if not q}
        for p, row, is_q in toks:
            if is_q:
                want = window(hist, row, n)
                assert want <= present, "a target's whole window is packed in its sequence"
            elif leakage == "windowed":
                want = window(hist, row, n) & present
            elif leakage == "block":
                want = {h for h in present if hist.time[h] < hist.time[row]}
            else:
                want = set()
            got = {r for t, r, q in toks if allowed[b, p, t] and not q and t != p}
            assert got == want, (b, p, row, is_q)
            assert allowed[b, p, p]
            # never another query token; never a later or equal-time interaction
            for t, r, q in toks:
                if t != p and allowed[b, p, t]:
                    assert not q
                    assert hist.time[r] < hist.time[row]
    for b in range(batch.layout.shape[0]):  # padding: seen by nobody, sees only itself
        pad = ~batch.layout.valid[b]
        for p in torch.nonzero(pad).flatten().tolist():
            assert allowed[b, p].sum() == 1 and allowed[b, p, p]
            assert not allowed[b, :, p][batch.layout.valid[b]].any()


@pytest.mark.parametrize("k", [1, 5])
def test_every_target_packed_once_with_its_window(k):
    hist = random_histories(7, users=6)
    targets = hist.split == 0
    blocks = make_blocks(hist, targets, k, 3)
    rows = np.concatenate([np.arange(s, e) for s, e in zip(blocks.target_start, blocks.target_end)])
    assert sorted(rows.tolist()) == np.flatnonzero(targets).tolist()
    assert (blocks.num_targets <= k).all() and (blocks.num_targets >= 1).all()
    for a, b, s, e in zip(blocks.context_start, blocks.context_end, blocks.target_start, blocks.target_end):
        assert (hist.user_start[a:e] == hist.user_start[s]).all(), "one user per sequence"
        for j in range(s, e):
            w = window(hist, j, 3)
            assert all(a <= h < b for h in w)
    if k == 1:  # the sliding window: exactly the window, nothing else
        for a, b, s in zip(blocks.context_start, blocks.context_end, blocks.target_start):
            assert set(range(a, b)) == window(hist, s, 3)


def test_equal_timestamps_never_context_for_each_other():
    # one user, three interactions at t=5 between others
    time = np.array([1, 5, 5, 5, 9, 9])
    hist = UserHistories.from_arrays(np.zeros(6), time, np.arange(6) % 5, np.arange(6) % 5, np.ones(6))
    for leakage in LEAKAGE_VARIANTS:
        for k in (1, 2, 6):
            _, batch = behavior_batch(hist, k, 10)
            allowed = allowed_attention(batch.layout, 10, leakage)
            for b, toks in tokens_of(batch.layout):
                for p, r, _ in toks:
                    for t, r2, _ in toks:
                        if t != p and time[r2] == time[r]:
                            assert not allowed[b, p, t], (leakage, k, r, r2)


def test_distance_and_positions_equal_sliding_window():
    hist = random_histories(3, users=3)
    n = 5
    _, sw = behavior_batch(hist, 1, n)
    _, dti = behavior_batch(hist, 6, n)

    def query_view(batch):
        dist = interaction_distance(batch.layout)
        allowed = allowed_attention(batch.layout, n, "windowed")
        out = {}
        for qi in batch.query_index.tolist():
            b, p = divmod(qi, batch.layout.shape[1])
            row = int(batch.layout.interaction[b, p])
            keys = torch.nonzero(allowed[b, p]).flatten()
            rel = batch.position_ids[b, p] - batch.position_ids[b, keys]
            out[row] = sorted(zip(batch.layout.interaction[b, keys].tolist(), dist[b, p, keys].tolist(),
                                  rel.tolist()))
        return out

    a, b = query_view(sw), query_view(dti)
    assert a.keys() == b.keys()
    for row in a:
        # same contexts at the same behaviour distances and the same relative RoPE positions
        assert [(r, d, rel) for r, d, rel in a[row] if r != row] == [(r, d, rel) for r, d, rel in b[row] if r != row]
        for r, d, rel in a[row]:
            if r != row:
                assert d == rel == hist.time_start[row] - r


@pytest.mark.parametrize("leakage", LEAKAGE_VARIANTS)
@pytest.mark.parametrize("span_causal", [False, True])
def test_token_level_mask(leakage, span_causal):
    hist = random_histories(11, users=3, max_len=8)
    texts = ["a", "b c", "d e f", "g", "h i", "j k l m", "n"]
    tok = lambda xs: [[100 + len(w) for w in x.split()] for x in xs]  # noqa: E731
    packer = TokenPacker(hist, texts, torch.randn(5, 4), tok, pad_id=0)
    blocks = make_blocks(hist, np.ones(len(hist), bool), 3, 2)
    batch = packer(blocks)
    lay = batch.layout
    allowed = allowed_attention(lay, 2, leakage, span_causal=span_causal)
    assert lay.shape[0] < len(blocks), "short sequences share rows"
    for b in range(lay.shape[0]):
        idx = torch.nonzero(lay.valid[b]).flatten().tolist()
        for p in idx:
            row, q = int(lay.interaction[b, p]), bool(lay.is_query[b, p])
            for t in idx:
                r2, q2 = int(lay.interaction[b, t]), bool(lay.is_query[b, t])
                same_span = (not q and not q2 and r2 == row) or t == p
                if lay.segment[b, p] != lay.segment[b, t]:
                    want = False
                elif same_span:
                    want = t <= p if span_causal else True
                elif q2:
                    want = False
                elif q:
                    want = r2 in window(hist, row, 2)
                elif leakage == "windowed":
                    want = r2 in window(hist, row, 2)
                elif leakage == "block":
                    want = hist.time[r2] < hist.time[row]
                else:
                    want = False
                assert bool(allowed[b, p, t]) == want, (b, p, t)
    # a query's RoPE position follows its last context token, as in the sliding-window stream
    for qi in batch.query_index.tolist():
        b, p = divmod(qi, lay.shape[1])
        row = int(lay.interaction[b, p])
        ctx = (lay.valid[b] & ~lay.is_query[b] & (lay.segment[b] == lay.segment[b, p])
               & (lay.interaction[b] < int(hist.time_start[row])))
        if ctx.any():
            assert batch.position_ids[b, p] == batch.position_ids[b][ctx].max() + 1


def test_additive_bias_is_sdpa_compatible():
    hist = random_histories(5, users=2)
    _, batch = behavior_batch(hist, 4, 3)
    allowed = allowed_attention(batch.layout, 3, "block")
    extra = torch.randn(allowed.shape[0], 2, *allowed.shape[1:])
    bias = attention_bias(allowed, extra)
    assert bias.shape == extra.shape
    assert torch.equal(bias[:, 0][allowed], extra[:, 0][allowed])
    assert (bias[:, 0][~allowed] == torch.finfo(torch.float32).min).all()
    plain = attention_bias(allowed)
    assert plain.shape[1] == 1 and set(plain.unique().tolist()) <= {0.0, torch.finfo(torch.float32).min}
    q = torch.randn(allowed.shape[0], 2, allowed.shape[1], 8)
    out = F.scaled_dot_product_attention(q, q, q, attn_mask=bias)
    assert torch.isfinite(out).all()
    # masked keys have exactly zero weight
    scores = (q @ q.transpose(-1, -2)) / 8 ** 0.5 + bias
    weights = scores.softmax(-1)
    assert (weights[~allowed[:, None].expand_as(weights)] == 0).all()


def test_batches_hold_about_the_requested_targets():
    nt = np.array([16, 16, 3, 16, 1, 16, 16])
    groups = batch_indices(nt, 32)
    assert np.concatenate(groups).tolist() == list(range(len(nt)))
    assert [int(nt[g].sum()) for g in groups] == [32, 20, 32]


@pytest.mark.parametrize("seed", range(5))
def test_assign_rows_fills_rows_without_overlap(seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 20, int(rng.integers(1, 60)))
    row, offset, rows = assign_rows(lengths)
    cap = int(lengths.max())
    used = np.zeros((rows, cap), int)
    for r, o, n in zip(row, offset, lengths):
        assert o + n <= cap
        used[r, o:o + n] += 1
    assert used.max() == 1 and used.sum() == lengths.sum()
    assert rows <= len(lengths) and rows >= -(-lengths.sum() // cap)
    # best-fit decreasing is within 11/9 OPT + 1 of the optimum; the sum bound is a lower bound of OPT
    assert rows <= 11 / 9 * -(-lengths.sum() // cap) + 1
    again = assign_rows(lengths)
    assert np.array_equal(again[0], row) and np.array_equal(again[1], offset)
    with pytest.raises(ValueError, match="does not fit"):
        assign_rows(lengths, cap - 1)


@pytest.mark.parametrize("seed", range(3))
def test_balance_rows_keeps_rows_within_one_sequence(seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(60, 200, int(rng.integers(2, 40)))
    rows = max(1, int(lengths.sum() // 400))
    row, offset, longest = balance_rows(lengths, rows)
    loads = np.bincount(row, weights=lengths, minlength=rows)
    assert loads.max() == longest and loads.sum() == lengths.sum()
    assert loads.max() - loads.min() <= lengths.max()  # LPT: no row is more than one sequence longer
    for r in range(rows):  # the sequences of a row lie end to end from column 0
        mine = np.flatnonzero(row == r)
        spans = sorted(zip(offset[mine], lengths[mine]))
        assert spans[0][0] == 0 and all(a + n == b for (a, n), (b, _) in zip(spans, spans[1:]))


@pytest.mark.parametrize("k", [1, 4, 40])
def test_row_packing_changes_only_the_padding(k):
    hist = random_histories(3, users=8, max_len=120 if k == 40 else 25)
    blocks = make_blocks(hist, np.ones(len(hist), bool), k, 3)
    e, v = torch.randn(7, 4), torch.randn(5, 4)
    packed = BehaviorPacker(hist, e, v)(blocks)
    plain = BehaviorPacker(hist, e, v, pack_rows=False)(blocks)
    assert packed.layout.shape[0] < plain.layout.shape[0] == len(blocks)
    lay = packed.layout
    for b in range(lay.shape[0]):  # every row: the contexts of all its sequences, then all their queries
        ctx = torch.nonzero(lay.valid[b] & ~lay.is_query[b]).flatten()
        qry = torch.nonzero(lay.valid[b] & lay.is_query[b]).flatten()
        if len(ctx) and len(qry):
            assert ctx.max() < qry.min()
    assert int(packed.layout.valid.sum()) == int(plain.layout.valid.sum())
    assert torch.equal(packed.target_rows, plain.target_rows)
    assert torch.equal(packed.labels, plain.labels)
    # every query sees the same contexts at the same distances and positions
    pa, pl = allowed_attention(packed.layout, 3), allowed_attention(plain.layout, 3)
    da, dl = interaction_distance(packed.layout), interaction_distance(plain.layout)
    for qa, ql in zip(packed.query_index.tolist(), plain.query_index.tolist()):
        (ba, xa), (bl, xl) = divmod(qa, packed.layout.shape[1]), divmod(ql, plain.layout.shape[1])
        seen_a = sorted((int(packed.layout.interaction[ba, t]), int(da[ba, xa, t])) for t in torch.nonzero(pa[ba, xa]))
        seen_l = sorted((int(plain.layout.interaction[bl, t]), int(dl[bl, xl, t])) for t in torch.nonzero(pl[bl, xl]))
        assert seen_a == seen_l
        assert packed.position_ids[ba, xa] == plain.position_ids[bl, xl]
