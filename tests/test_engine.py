"""The continuous-batching engine: the scheduler's plans as plain data, and the engine's tokens
equal to :func:`smoe.inference.generate` run on each prompt alone (greedy and seeded sampling),
with requests joining and leaving mid-way, aborts freeing slots, and the MoE refusals.
"""

from __future__ import annotations

import pytest
import torch

from smoe.config import ModelConfig, MoEConfig
from smoe.inference import generate
from smoe.inference.engine import Engine, SamplingParams, Scheduler
from smoe.model import SMoETransformer

V = 64


def tiny_model(seed: int = 0, **moe) -> SMoETransformer:
    """init_std 0.3: logits far from ties, so a different batch's float rounding cannot flip
    an arg-max (the engine batches rows that generate runs alone)."""
    torch.manual_seed(seed)
    m = dict(hidden_size=32, expert_size=24, num_experts=4, top_k=2, init_std=0.3)
    m.update(moe)
    cfg = ModelConfig(vocab_size=V, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                      max_seq_len=48, ffn_size=48, init_std=0.3, moe=MoEConfig(**m))
    return SMoETransformer(cfg).eval()


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _alone(model, prompt, n, **kw) -> list[int]:
    out = generate(model, prompt, n, **kw)
    return out[len(prompt):].tolist()


# -- scheduler ---------------------------------------------------------------------------------
def test_scheduler_plans_fifo_with_slots_and_budget():
    s = Scheduler(num_slots=2, max_prefill_tokens=10)
    for rid, n in (("a", 4), ("b", 8), ("c", 3)):
        s.add(rid, n)
    p1 = s.schedule()
    assert p1.decode == () and p1.prefill == ("a",)          # a (4) + b (8) > budget 10
    p2 = s.schedule()
    assert p2.decode == ("a",) and p2.prefill == ("b",)      # b alone may exceed nothing
    p3 = s.schedule()
    assert p3.decode == ("a", "b") and p3.prefill == ()      # no free slot for c
    assert s.finish("a") and s.num_waiting == 1
    p4 = s.schedule()
    assert p4.decode == ("b",) and p4.prefill == ("c",)
    assert s.finish("c") and s.finish("b") and not s.finish("zz")
    assert s.schedule().empty
    big = Scheduler(num_slots=1, max_prefill_tokens=2)
    big.add("long", 100)                                       # over budget, still admitted
    assert big.schedule().prefill == ("long",)
    with pytest.raises(ValueError, match="num_slots"):
        Scheduler(0)


# -- engine against generate -----------------------------------------------------------------
def test_engine_greedy_equals_generate_alone():
    model = tiny_model()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, V, (n,), generator=g).tolist() for n in (5, 1, 9, 3, 12, 7)]
    lengths = [6, 10, 3, 8, 5, 12]
    expected = [_alone(model, p, n) for p, n in zip(prompts, lengths)]
    engine = Engine(model, max_batch=3, max_prefill_tokens=8)
    got = engine.generate(prompts, [SamplingParams(max_tokens=n) for n in lengths])
    assert got == expected
    assert engine.runner.num_free == 3 and not engine.has_unfinished()


def test_requests_join_and_leave_mid_batch():
    """Requests added while others are decoding: each joins at the next step (no re-prefill of
    the running ones: the forward of a decode step gets one token per running row)."""
    model = tiny_model(1)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, V, (n,), generator=g).tolist() for n in (4, 6, 2, 8)]
    expected = [_alone(model, p, 10) for p in prompts]
    seen_T = []
    hook = model.embed.register_forward_hook(lambda m, a, o: seen_T.append(tuple(a[0].shape)))
    engine = Engine(model, max_batch=4)
    out: dict[str, list[int]] = {}
    ids = []
    for i, p in enumerate(prompts):
        ids.append(engine.add_request(p, SamplingParams(max_tokens=10)))
        for _ in range(2):  # two steps between arrivals
            for ev in engine.step():
                out.setdefault(ev.request_id, []).append(ev.token_id)
    while engine.has_unfinished():
        for ev in engine.step():
            out.setdefault(ev.request_id, []).append(ev.token_id)
    hook.remove()
    assert [out[i] for i in ids] == expected
    decode_shapes = [s for s in seen_T if s[1] == 1 and s[0] > 1]
    assert decode_shapes and max(b for b, _ in decode_shapes) == 4   # all four decoded together
    prefills = [s for s in seen_T if s[0] == 1 and s[1] > 1]
    assert sorted(t for _, t in prefills) == sorted(len(p) for p in prompts if len(p) > 1)


def test_prompts_admitted_together_prefill_in_one_packed_forward():
    """Prompts admitted in one step are prefilled in one forward, packed into one row of
    their total length (no padding), and each still gets the tokens it gets alone, greedy or
    seeded, then decodes from its own slot."""
    model = tiny_model(3)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, V, (n,), generator=g).tolist() for n in (6, 6, 4, 6)]
    params = [SamplingParams(max_tokens=8), SamplingParams(max_tokens=5),
              SamplingParams(max_tokens=8), SamplingParams(max_tokens=8, temperature=0.9,
                                                           seed=4)]
    expected = [_alone(model, p, sp.max_tokens, **({"temperature": 0.9, "seed": 4}
                                                     if sp.temperature else {}))
                for p, sp in zip(prompts, params)]
    seen_T = []
    hook = model.embed.register_forward_hook(lambda m, a, o: seen_T.append(tuple(a[0].shape)))
    engine = Engine(model, max_batch=4)
    got = engine.generate(prompts, params)
    hook.remove()
    assert got == expected
    assert [s for s in seen_T if s[1] > 1] == [(1, 22)]
    assert engine.runner.num_free == 4


def test_seeded_sampling_equals_generate_alone_and_stop_tokens():
    model = tiny_model(2)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, V, (n,), generator=g).tolist() for n in (3, 7, 5)]
    kw = dict(temperature=0.9, top_p=0.9)
    expected = [_alone(model, p, 10, seed=s, **kw) for s, p in enumerate(prompts)]
    engine = Engine(model, max_batch=3)
    got = engine.generate(prompts, [SamplingParams(max_tokens=10, seed=s, **kw)
                                    for s in range(3)])
    assert got == expected
    # A stop token ends a request at its first occurrence (the token is emitted).
    greedy = _alone(model, prompts[0], 10)
    stop = greedy[4]
    first = greedy.index(stop)
    out = engine.generate([prompts[0]], SamplingParams(max_tokens=10, stop_token_ids=(stop,)))
    assert out == [greedy[:first + 1]]


def test_abort_frees_the_slot_and_emits_an_event():
    model = tiny_model()
    engine = Engine(model, max_batch=2)
    a = engine.add_request([1, 2, 3], SamplingParams(max_tokens=30))
    b = engine.add_request([4, 5], SamplingParams(max_tokens=30))
    c = engine.add_request([6], SamplingParams(max_tokens=3))
    engine.step()
    assert engine.num_running == 2 and engine.num_waiting == 1
    engine.abort(a)
    events = engine.step()
    assert any(e.request_id == a and e.finish_reason == "abort" for e in events)
    assert any(e.request_id == c for e in events)        # c took a's slot in the same step
    expected_c = _alone(model, [6], 3)
    got_c = [e.token_id for e in events if e.request_id == c]
    aborted_b = False
    while engine.has_unfinished():
        evs = engine.step()
        got_c += [e.token_id for e in evs if e.request_id == c]
        if len(got_c) == 3 and not aborted_b:
            engine.abort(b)
            aborted_b = True
    assert got_c == expected_c and engine.runner.num_free == 2


def test_bad_requests_and_coupled_routing_are_refused():
    model = tiny_model()
    engine = Engine(model, max_batch=1)
    with pytest.raises(ValueError, match="empty"):
        engine.add_request([])
    with pytest.raises(ValueError, match="exceeds the context"):
        engine.add_request([1] * 40, SamplingParams(max_tokens=10))
    with pytest.raises(ValueError, match="token ids"):
        engine.add_request([V])
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request([1], request_id="x")
        engine.add_request([1], request_id="x")
    for field, value in (("max_tokens", 0), ("temperature", -1.0), ("top_p", 0.0),
                         ("seed", "1")):
        with pytest.raises(ValueError, match=field):
            SamplingParams(**{field: value})
    with pytest.raises(ValueError, match="expert_choice"):
        Engine(tiny_model(router="expert_choice", top_k=2, capacity_factor=1.0))
    capped = tiny_model(capacity_factor=1.0)
    with pytest.raises(ValueError, match="force_dropless"):
        Engine(capped)
    Engine(capped, force_dropless=True)
    assert all(layer.config.capacity_factor is None for _, layer in capped.moe_layers())
