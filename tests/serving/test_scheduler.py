"""The scheduler's parts on their own: slicing and regrouping queries into batches (against torchrec's own
KJT ops), the work queue's coalescing, and the hill climber on a latency curve with a known best point."""
from __future__ import annotations

import numpy as np
import torch
from torchrec import KeyedJaggedTensor

from torchrec_hps.serving.query import ModelSignature, Query, gather, padded, scatter, split
from torchrec_hps.serving.scheduler import WorkQueue
from torchrec_hps.serving.tuner import HillClimber, Knob

SIG = ModelSignature(features=("a", "b", "c"), id_bounds=(100, 100, 100), dense_in_features=2)


def _query(n: int, gen: torch.Generator, done=lambda q, e: None) -> Query:
    lengths = torch.randint(0, 4, (3, n), generator=gen)
    values = torch.randint(0, 100, (int(lengths.sum()),), generator=gen)
    return Query(torch.randn(n, 2, generator=gen), lengths, values, None, deadline=1e18, done=done)


def _rows(q: Query, start: int, stop: int):
    """Per sample of [start, stop): (dense row, ids of each feature), from torchrec's own KJT split."""
    kjt = KeyedJaggedTensor(keys=list(SIG.features), values=q.values, lengths=q.lengths.reshape(-1))
    per = kjt.to_dict()
    out = []
    for i in range(start, stop):
        ids = []
        for f in SIG.features:
            jt = per[f]
            off = jt.offsets()
            ids.append(jt.values()[off[i]:off[i + 1]].tolist())
        out.append((q.dense[i].tolist(), ids))
    return out


def test_gather_regroups_slices_of_several_queries_into_one_kjt():
    gen = torch.Generator().manual_seed(0)
    queries = [_query(n, gen) for n in (5, 1, 9, 4)]
    slices = split(queries[0], 2) + [split(queries[1], 8)[0]] + split(queries[2], 4)[1:] + split(queries[3], 4)
    batch = gather(slices, SIG)
    want = [row for s in slices for row in _rows(s.query, s.start, s.stop)]
    got_kjt = batch.features.to_dict()
    got = []
    for i in range(sum(s.size for s in slices)):
        ids = []
        for f in SIG.features:
            off = got_kjt[f].offsets()
            ids.append(got_kjt[f].values()[off[i]:off[i + 1]].tolist())
        got.append((batch.dense[i].tolist(), ids))
    assert got == want
    whole = gather([split(queries[2], 100)[0]], SIG)  # a whole query alone: its own tensors
    assert whole.features.values() is queries[2].values


def test_scatter_answers_each_query_once_with_its_own_scores():
    gen = torch.Generator().manual_seed(1)
    answered = {}
    queries = [_query(n, gen, done=lambda q, e: answered.setdefault(id(q), (q.scores.clone(), e)))
               for n in (3, 6)]
    pieces = [split(q, 4) for q in queries]
    first = gather([pieces[0][0], pieces[1][0]], SIG)  # 3 + 4 samples
    scatter(first, torch.arange(7, dtype=torch.float32))
    assert id(queries[0]) in answered and id(queries[1]) not in answered
    scatter(gather([pieces[1][1]], SIG), torch.tensor([70.0, 71.0]))
    torch.testing.assert_close(answered[id(queries[0])][0], torch.tensor([0.0, 1.0, 2.0]))
    torch.testing.assert_close(answered[id(queries[1])][0], torch.tensor([3.0, 4.0, 5.0, 6.0, 70.0, 71.0]))
    queries[1].fail(RuntimeError("late"))  # already answered: no second answer
    assert answered[id(queries[1])][1] is None


def test_padded_batches_score_like_the_unpadded_ones():
    gen = torch.Generator().manual_seed(3)
    answered = {}
    queries = [_query(n, gen, done=lambda q, e: answered.setdefault(id(q), q.scores.clone())) for n in (5, 9)]
    batch = gather([s for q in queries for s in split(q, 100)], SIG)
    big = padded(batch)
    assert big.dense.shape[0] == 64 and big.features.lengths().numel() == 3 * 64
    assert torch.equal(big.features.to_dict()["b"].values(), batch.features.to_dict()["b"].values())
    assert int(big.features.lengths().view(3, 64)[:, 14:].sum()) == 0
    scatter(big, torch.arange(64, dtype=torch.float32))  # pad rows' scores are dropped
    torch.testing.assert_close(answered[id(queries[1])], torch.arange(5, 14, dtype=torch.float32))


def test_work_queue_coalesces_one_model_version_up_to_the_batch_size():
    gen = torch.Generator().manual_seed(2)
    a, b = object(), object()
    qs = []
    for served in (a, a, b, a):
        q = _query(3, gen)
        q.served = served
        qs.append(q)
    wq = WorkQueue()
    wq.put([s for q in qs for s in split(q, 3)])
    first = wq.take(7)
    assert [s.query for s in first] == [qs[0], qs[1]]  # b's slice is not mixed in; 3 + 3 <= 7 < 9
    assert [s.query for s in wq.take(100)] == [qs[2]]
    assert [s.query for s in wq.take(100)] == [qs[3]]
    assert wq.take(100, timeout=0.01) == []


def _climb(p99_ms, capacity, target_ms, start, windows=80):
    state = dict(start)
    clock, work = [0.0], [0.0, 0.0]

    def done():
        return tuple(work)

    climber = HillClimber([Knob("batch_size", 8, 4096), Knob("offload_threshold", 1, 4096)], state.__getitem__,
                          state.__setitem__, target_s=target_ms / 1e3, capacity=done, window=10, rest_windows=2,
                          clock=lambda: clock[0])
    for _ in range(windows):
        clock[0] += 1.0
        work[0] += capacity(state)  # one busy second's samples per window
        work[1] += 1.0
        for _ in range(10):
            climber.observe(arrival=clock[0], latency_s=p99_ms(state) / 1e3)
    return state, climber


def test_hill_climber_cuts_the_tail_while_the_target_is_missed():
    best_b, best_t = 64, 512

    def p99(s):  # a convex tail-latency curve in log2 of each knob, minimum at (64, 512), always over 5 ms
        return 10.0 + 3 * (np.log2(s["batch_size"]) - np.log2(best_b)) ** 2 + \
            2 * (np.log2(s["offload_threshold"]) - np.log2(best_t)) ** 2

    state, climber = _climb(p99, lambda s: 1000.0, target_ms=5.0,
                            start={"batch_size": 256, "offload_threshold": 64})
    assert state == {"batch_size": best_b, "offload_threshold": best_t}, climber.history[-5:]
    stale = len(climber.history)
    climber.observe(arrival=-10, latency_s=1.0)  # a query queued under an older setting: ignored
    assert len(climber.history) == stale and climber._latencies == []


def test_hill_climber_takes_the_most_capacity_that_keeps_the_target():
    # larger batches carry more load, and cost tail latency: 2 ms per doubling from 3 ms at batch 8;
    # under a 12 ms target the best is batch 128 (11 ms), not 256 (13 ms)
    def p99(s):
        return 3.0 + 2.0 * np.log2(s["batch_size"] / 8)

    state, climber = _climb(p99, lambda s: 100.0 * np.log2(s["batch_size"]), target_ms=12.0,
                            start={"batch_size": 32, "offload_threshold": 64})
    assert state["batch_size"] == 128, climber.history[-6:]
