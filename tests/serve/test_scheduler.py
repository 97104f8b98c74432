"""The continuous-batching scheduler driven step by step (no thread, no HTTP): requests joining and leaving the
running batch at arbitrary steps get exactly the tokens they get alone; cancellation, EOS, length and seeded
sampling; the incremental detokenizer's stop strings."""

from __future__ import annotations

import pytest
import torch

from vblora.serve.sampling import Sampling
from vblora.serve.scheduler import GenerationRequest, Overloaded, Scheduler
from vblora.serve.text import IncrementalText

EOS = 3


@pytest.fixture(scope="module")
def model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


def alone(model, prompt, n, eos=None):
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=eos,
                             pad_token_id=0)
    toks = out[0, len(prompt):].tolist()
    return toks[:toks.index(eos)] if eos in toks else toks


def request(prompt, n, events, sampling=Sampling(temperature=0.0)):
    req = GenerationRequest(prompt, n, sampling=sampling)
    req.emit = lambda kind, value: events.setdefault(req.id, []).append((kind, value))
    return req


def tokens_of(events, req):
    return [v for k, v in events[req.id] if k == "token"]


def test_rows_joining_and_leaving_at_any_step_equal_each_alone(model):
    g = torch.Generator().manual_seed(3)
    specs = [(torch.randint(4, 100, (int(L),), generator=g).tolist(), int(n))
             for L, n in zip(torch.randint(1, 25, (14,), generator=g), torch.randint(1, 15, (14,), generator=g))]
    arrivals = sorted(torch.randint(0, 30, (14,), generator=g).tolist())  # step at which each request arrives
    sched = Scheduler(model, None, eos_ids=[], max_batch=4, max_prefill_tokens=40)
    events, reqs, step, widths = {}, [], 0, set()
    while len(reqs) < len(specs) or len(sched.batch) or sched.waiting:
        while len(reqs) < len(specs) and arrivals[len(reqs)] <= step:
            reqs.append(request(*specs[len(reqs)], events))
            sched.submit(reqs[-1])
        sched.step()
        widths.add(len(sched.batch))
        step += 1
    assert {1, 4} <= widths  # the batch grew and shrank
    for req, (prompt, n) in zip(reqs, specs):
        assert tokens_of(events, req) == alone(model, prompt, n), prompt
        assert events[req.id][-1] == ("done", "length")


def test_cancel_eos_and_the_queue_bound(model):
    sched = Scheduler(model, None, eos_ids=[EOS], max_batch=2, max_waiting=1)
    events = {}
    a, b, c = request([5, 6, 7], 12, events), request([8, 9], 12, events), request([10], 5, events)
    sched.submit(a)
    with pytest.raises(Overloaded):
        sched.submit(b)  # one waiting already
    sched.step()
    sched.submit(b)
    sched.step()
    sched.cancel(a)
    sched.submit(c)
    for _ in range(20):
        sched.step()
    # a: prefill + decode in step 1, one more decode in step 2, then cancelled before step 3
    assert events[a.id][-1] == ("done", "cancelled") and len(tokens_of(events, a)) == 3
    for req, prompt in ((b, [8, 9]), (c, [10])):
        want = alone(model, prompt, req.max_tokens, eos=EOS)
        assert tokens_of(events, req) == want
        assert events[req.id][-1] == ("done", "length" if len(want) == req.max_tokens else "stop")
    assert sched.stats()["requests"] == {"completed": 2, "cancelled": 1, "failed": 0, "rejected": 1}


def test_seeded_sampling_does_not_depend_on_the_batch(model):
    s = Sampling(temperature=0.8, top_p=0.9, seed=7)

    def run(company: int):
        sched = Scheduler(model, None, max_batch=8)
        events = {}
        reqs = [request([11, 12, 13], 10, events, s)] + [request([20 + i] * (i + 1), 10, events, Sampling(1.0))
                                                         for i in range(company)]
        for r in reqs:
            sched.submit(r)
        while len(sched.batch) or sched.waiting:
            sched.step()
        return tokens_of(events, reqs[0])

    first = run(0)
    assert run(5) == first and len(first) == 10
    assert first != alone(model, [11, 12, 13], 10)  # it did sample


def test_a_failing_forward_fails_its_requests_and_the_scheduler_goes_on(model):
    class Store:
        def rows(self, handles):
            if "bad" in handles:
                raise RuntimeError("cannot compose")
            import contextlib
            return contextlib.nullcontext()

    sched = Scheduler(model, Store(), max_batch=4)
    events = {}
    bad, good = request([5], 3, events), request([6, 7], 3, events)
    bad.adapter = "bad"
    sched.submit(bad)
    sched.step()
    sched.submit(good)
    while len(sched.batch) or sched.waiting:
        sched.step()
    assert events[bad.id][-1][0] == "error" and "cannot compose" in events[bad.id][-1][1]
    assert tokens_of(events, good) == alone(model, [6, 7], 3)


class WordTokenizer:
    """decode = words joined by spaces; id 0 is special (skipped)."""
    words = ["<eos>", "hello", "wor", "ld", "stop", "here", "now"]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(("" if i == 0 else self.words[i]) + ("" if self.words[i] == "wor" else " ") for i in ids)


def test_incremental_text_holds_back_a_possible_stop_string():
    t = IncrementalText(WordTokenizer(), stop=["world"])
    assert t.push(1) == ("hello ", False)
    assert t.push(2) == ("", False)  # "wor" may begin "world": held
    assert t.push(3) == ("", True)  # "world" found: cut before it
    assert t.text == "hello "
    t = IncrementalText(WordTokenizer(), stop=["stop here"])
    out = [t.push(i) for i in (1, 4, 6)]  # "stop " is held until "now" shows it is not "stop here"
    assert "".join(d for d, _ in out) + t.finish() == "hello stop now "
    assert out[1] == ("", False)


def test_sliding_window_model_beyond_its_window(model):
    """Mistral with a 6-token window, prompts and generations past it: batched rows equal each alone."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, sliding_window=6)
    mistral = MistralForCausalLM(cfg).eval()
    sched = Scheduler(mistral, None, max_batch=4)
    events, reqs = {}, []
    for prompt in ([5, 6, 7], [8] * 9, list(range(10, 25)), [30, 31, 32, 33]):
        reqs.append(request(prompt, 12, events))
        sched.submit(reqs[-1])
        sched.step()  # each joins a batch already decoding
    while len(sched.batch) or sched.waiting:
        sched.step()
    for req in reqs:
        assert tokens_of(events, req) == alone(mistral, req.prompt, 12)


def test_a_stop_string_cancel_counts_as_completed(model):
    sched = Scheduler(model, None, max_batch=2)
    events = {}
    a, b = request([5, 6], 20, events), request([7, 8], 20, events)
    sched.submit(a)
    sched.submit(b)
    sched.step()
    sched.cancel(a, "stop")  # the server found a stop string in a's text
    sched.cancel(b)  # b's client went away
    sched.step()
    assert events[a.id][-1] == ("done", "stop") and events[b.id][-1] == ("done", "cancelled")
    assert not len(sched.batch)
    assert sched.stats()["requests"] == {"completed": 1, "cancelled": 1, "failed": 0, "rejected": 0}
