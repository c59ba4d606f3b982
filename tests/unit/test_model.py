"""OneRec V1/V2 models, their layers and constrained beam search: fast paths against the plain
references, learning, generation constraints, FLOPs, determinism, serialization. Tiny sizes."""
from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
from safetensors.torch import load_file, save_file

from onerec.config import ModelConfig
from onerec.model import (
    KVCache,
    MoE,
    OneRecV1,
    OneRecV2,
    attend,
    build_model,
    dict_trie,
    generate,
    reference_beam_search,
    reference_topk_next_items,
    topk_next_items,
)
from onerec.model.layers import CrossAttention, SelfAttention

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SIZES = [4, 4, 4]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def model_config(arch: str, **kw) -> ModelConfig:
    base = dict(arch=arch, d_model=32, n_heads=4, n_layers=2, n_experts=4, top_k_experts=2,
                max_seq_len=8, session_len=3, dropout=0.0)
    return ModelConfig(**{**base, **kw})


def make_model(arch: str, seed: int = 0, device: str = "cpu", extra: dict | None = None, **kw):
    torch.manual_seed(seed)
    extra = {"codebook_sizes": SIZES, "n_kv_heads": 2, **(extra or {})}
    return build_model(model_config(arch, **kw), **extra).to(device)


def random_codes(n_items: int, sizes=SIZES, seed: int = 0) -> torch.Tensor:
    """n_items unique codes (N, L) over the codebooks."""
    g = torch.Generator().manual_seed(seed)
    flat = torch.randperm(sizes[0] * sizes[1] * sizes[2], generator=g)[:n_items]
    return torch.stack([flat // (sizes[1] * sizes[2]), flat // sizes[2] % sizes[1], flat % sizes[2]], 1)


def brute_force_fns(codes: torch.Tensor):
    """allowed_fn / item_of_fn by comparing against every code (what the tokenizer's trie gives)."""
    def allowed(prefix):
        l = prefix.shape[1]
        match = (codes[None, :, :l].to(prefix.device) == prefix[:, None, :]).all(-1)  # (X, N)
        rows, item = match.nonzero(as_tuple=True)
        out = torch.zeros(prefix.shape[0], SIZES[l], dtype=torch.bool, device=prefix.device)
        out[rows, codes.to(prefix.device)[item, l]] = True
        return out

    def item_of(q):
        match = (codes[None].to(q.device) == q[:, None]).all(-1)                       # (X, N)
        return torch.where(match.any(1), match.float().argmax(1), torch.full_like(q[:, 0], -1))

    return allowed, item_of


def make_batch(codes: torch.Tensor, n_users: int, seq: int, session: int, seed: int = 0,
               n_side: int = 0, device: str = "cpu") -> dict:
    """Random contexts (right-padded, at least one event) and distinct-item target sessions."""
    g = torch.Generator().manual_seed(seed)
    n = codes.shape[0]
    ctx_items = torch.randint(0, n, (n_users, seq), generator=g)
    lengths = torch.randint(1, seq + 1, (n_users,), generator=g)
    mask = torch.arange(seq)[None, :] < lengths[:, None]                     # (B, S)
    context = torch.where(mask[..., None], codes[ctx_items], torch.full_like(codes[ctx_items], -1))
    target_items = torch.stack([torch.randperm(n, generator=g)[:session] for _ in range(n_users)])
    batch = {"context": context, "context_items": torch.where(mask, ctx_items + 1, 0), "context_mask": mask,
             "target": codes[target_items], "target_items": target_items}
    if n_side:
        batch["side"] = torch.randn(n_users, seq, n_side, generator=g)
    return {k: v.to(device) for k, v in batch.items()}


def model_batch(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "target_items"}


def spread_weights(model, std: float = 0.3, seed: int = 1):
    """Random models with large weights, so beam scores are far apart (no near-ties)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


# --------------------------------------------------------------------------- layers


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n_heads,n_kv_heads,causal,padded", [
    (4, 4, True, False), (4, 2, True, False), (4, 1, False, True), (4, 2, True, True), (2, 2, False, False),
])
def test_attention_fast_path_matches_reference(device, n_heads, n_kv_heads, causal, padded):
    torch.manual_seed(0)
    b, t, hd = 3, 7, 8
    q = torch.randn(b, n_heads, t, hd, device=device)
    k, v = torch.randn(2, b, n_kv_heads, t, hd, device=device)
    mask = None
    if padded:
        mask = (torch.arange(t, device=device)[None, :] < torch.tensor([7, 4, 1], device=device)[:, None])
        mask = mask[:, None, None, :]                                          # (B, 1, 1, S)
    fast = attend(q, k, v, mask, causal)
    ref = attend(q, k, v, mask, causal, reference=True)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_cross_attention_shapes_and_gqa_padding(device):
    """Cross-attention: T queries over S != T keys with padding, GQA; padded keys are ignored."""
    torch.manual_seed(0)
    q = torch.randn(2, 4, 3, 8, device=device)
    k, v = torch.randn(2, 2, 2, 6, 8, device=device)
    key_mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]], dtype=torch.bool, device=device)
    fast = attend(q, k, v, key_mask[:, None, None, :])
    ref = attend(q, k, v, key_mask[:, None, None, :], reference=True)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
    k2, v2 = k.clone(), v.clone()
    k2[1, :, 2:], v2[1, :, 2:] = 99.0, -99.0                                   # change padded keys only
    torch.testing.assert_close(attend(q, k2, v2, key_mask[:, None, None, :]), fast, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n_heads,n_kv_heads,keys", [(2, 1, 1), (2, 1, 4), (4, 2, 3), (4, 4, 16)])
def test_one_query_over_a_few_keys_matches_reference(device, n_heads, n_kv_heads, keys):
    """A beam-search step (one query, the KV cache's few keys, no mask) takes its own fast path."""
    torch.manual_seed(0)
    q = torch.randn(5, n_heads, 1, 8, device=device)
    k, v = torch.randn(2, 5, n_kv_heads, keys, 8, device=device)
    torch.testing.assert_close(attend(q, k, v), attend(q, k, v, reference=True), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_cross_attention_shares_a_key_row_among_its_group_of_query_rows(device):
    """3 users x 4 beams reading their user's memory row = the memory copied to every beam."""
    torch.manual_seed(0)
    attn = CrossAttention(16, 4).to(device).eval()
    x = torch.randn(12, 2, 16, device=device)                                 # (B'*g, T, D)
    k, v = torch.randn(2, 3, 2, 5, 4, device=device)                           # (B', Hkv, S, hd)
    key_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]], dtype=torch.bool, device=device)
    fan = torch.arange(3, device=device).repeat_interleave(4)
    copied = attn(x, k[fan], v[fan], key_mask[fan])
    torch.testing.assert_close(attn(x, k, v, key_mask), copied, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="do not divide"):
        attn(x[:10], k, v, key_mask)


def test_kv_cache_decoding_matches_full_causal_attention():
    torch.manual_seed(0)
    attn = SelfAttention(32, 4, 2, causal=True).eval()
    x = torch.randn(2, 6, 32)
    full = attn(x)
    cache = KVCache(1)
    steps = [attn(x[:, :3], cache=cache)] + [attn(x[:, i:i + 1], cache=cache) for i in range(3, 6)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
    cache = KVCache(1)                                                          # chunk of 2 after 4
    steps = [attn(x[:, :4], cache=cache), attn(x[:, 4:], cache=cache)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("top_k,activation,tokens", [(1, "swiglu", 5), (2, "swiglu", 5), (2, "gelu", 5),
                                                     (4, "swiglu", 5), (1, "swiglu", 1)])
def test_moe_dispatch_matches_reference_loop(top_k, activation, tokens):
    """tokens=1: 3 tokens over 4 experts (top-1), so at least one expert gets none."""
    torch.manual_seed(0)
    moe = MoE(16, 24, 4, top_k, activation)
    with torch.no_grad():
        moe.router.weight.normal_(0, 1.0)                                        # uneven loads
    x = torch.randn(3, tokens, 16, requires_grad=True)
    out, aux = moe(x)
    grads = torch.autograd.grad((out.square().sum() + aux), [x, moe.w_in, moe.router.weight])
    moe.reference = True
    ref_out, ref_aux = moe(x)
    ref_grads = torch.autograd.grad((ref_out.square().sum() + ref_aux), [x, moe.w_in, moe.router.weight])
    assert out.shape == (3, tokens, 16)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(aux, ref_aux, atol=1e-6, rtol=1e-6)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)


def test_moe_skips_the_balance_loss_only_for_pure_inference():
    """eval + no_grad (serving): same output, aux 0; in training or with grad it is computed."""
    torch.manual_seed(0)
    moe = MoE(8, 16, 4, 2)
    x = torch.randn(2, 6, 8)
    out, aux = moe(x)
    assert aux.item() > 0
    moe.eval()
    with torch.no_grad():
        served, served_aux = moe(x)
    torch.testing.assert_close(served, out.detach())
    assert served_aux.item() == 0
    assert moe(x)[1].item() == pytest.approx(aux.item())                          # eval with grad: kept


def test_moe_balance_loss_is_one_when_uniform():
    moe = MoE(8, 16, 4, 1)
    with torch.no_grad():
        moe.router.weight.zero_()                                                # uniform router probs
    x = torch.randn(64, 8)
    _, aux = moe(x)
    assert aux.item() == pytest.approx(1.0, abs=1e-6)                            # E * sum f_e / E


# --------------------------------------------------------------------------- models


@pytest.mark.parametrize("arch", ["v1", "v2"])
def test_forward_shapes_reference_path_and_loss_decreases(arch):
    codes = random_codes(30)
    model = make_model(arch, extra={"n_side_features": 2, "n_user_features": 3})
    batch = model_batch(make_batch(codes, 6, 8, 3, n_side=2))
    batch["user"] = torch.randn(6, 3)
    logits, loss, aux = model(batch)
    assert [tuple(lg.shape) for lg in logits] == [(6, 3, k) for k in SIZES]
    assert torch.isfinite(loss) and set(aux) == {"ce", "moe_aux"}
    assert aux["ce"].item() == pytest.approx(torch.log(torch.tensor(4.0)).item(), abs=0.1)  # ~uniform at init
    model.set_reference(True)
    torch.testing.assert_close(model(batch)[1], loss, atol=1e-5, rtol=1e-5)
    model.set_reference(False)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(15):
        opt.zero_grad()
        model(batch)[1].backward()
        opt.step()
    assert model(batch)[1].item() < loss.item() - 0.1


@pytest.mark.parametrize("arch", ["v1", "v2"])
def test_padding_side_and_target_mask(arch):
    """Left- and right-padded contexts give the same outputs; masked target items add no loss."""
    codes = random_codes(30)
    model = make_model(arch).eval()
    batch = model_batch(make_batch(codes, 4, 6, 2))
    mask = batch["context_mask"]
    order = torch.argsort(mask.int(), dim=1, stable=True)                     # padding first
    left = dict(batch, context=torch.gather(batch["context"], 1, order[..., None].expand(-1, -1, 3)),
                context_mask=torch.gather(mask, 1, order))
    with torch.no_grad():
        torch.testing.assert_close(model(left)[0][0], model(batch)[0][0], atol=1e-5, rtol=1e-5)
        first = dict(batch, target=batch["target"][:, :1])
        masked = dict(batch, target_mask=torch.tensor([[True, False]] * 4))
        torch.testing.assert_close(model(masked)[1], model(first)[1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["v1", "v2"])
def test_overfits_tiny_data_and_generates_the_target_sessions(arch):
    """16 users, 30 items with unique 3-token codes over 4x4x4, fixed next sessions of 3 items:
    the loss goes near zero and beam search then returns each user's session as its best beam."""
    codes = random_codes(30)
    data = make_batch(codes, 16, 6, 3, seed=1)
    batch = model_batch(data)
    model = make_model(arch, n_layers=1, n_experts=2, top_k_experts=1, extra={"n_encoder_layers": 1}
                       if arch == "v1" else {})
    steps = 200
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / steps)   # decay: no late spikes
    for _ in range(steps):
        opt.zero_grad()
        model(batch)[1].backward()
        opt.step()
        sched.step()
    model.eval()
    with torch.no_grad():
        ce = model(batch)[2]["ce"].item()
    assert ce < 0.01, f"{arch}: cross-entropy {ce:.4f} after {steps} steps"
    allowed, item_of = brute_force_fns(codes)
    items, _ = generate(model, batch, allowed, item_of, beam_size=4, session_len=3, topk=2)
    assert torch.equal(items[:, 0], data["target_items"])
    next_items, _ = topk_next_items(model, batch, allowed, item_of, beam_size=4, k=3)
    assert torch.equal(next_items[:, 0], data["target_items"][:, 0])


# --------------------------------------------------------------------------- beam search


@pytest.mark.parametrize("arch", ["v1", "v2"])
def test_generated_sessions_are_valid_items_without_repeats(arch):
    codes = random_codes(12)                                                   # few items: repeats tempt
    model = spread_weights(make_model(arch, n_layers=1))
    batch = model_batch(make_batch(codes, 5, 8, 3))
    allowed, item_of = brute_force_fns(codes)
    items, scores = generate(model, batch, allowed, item_of, beam_size=6, session_len=3, topk=6)
    assert items.shape == (5, 6, 3) and scores.shape == (5, 6)
    live = torch.isfinite(scores)
    assert live[:, 0].all()
    assert ((items >= 0) & (items < 12))[live].all()                           # valid items
    for sess in items[live]:
        assert len(set(sess.tolist())) == 3                                    # no repeats
    assert (items[~live] == -1).all()
    assert (scores[:, :-1] >= scores[:, 1:]).all()                             # best first
    sessions = {tuple(s) for s in items[0][live[0]].tolist()}
    assert len(sessions) == int(live[0].sum())                                 # beams are distinct


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch,n_items,session_len,beam,item_embedding", [
    ("v1", 8, 2, 3, False), ("v2", 8, 3, 4, False), ("v1", 6, 3, 4, True), ("v2", 20, 1, 5, False),
    ("v2", 8, 2, 4, True),
])
def test_batched_beam_search_matches_reference(device, arch, n_items, session_len, beam, item_embedding,
                                               monkeypatch):
    """Same items and scores (incl. -inf for beams that ran out of non-repeating items); few items,
    so the no-repeat mask is exercised."""
    import onerec.model.beam as beam_module

    masked = []
    seen_fn = beam_module._completes_seen_item

    def counting(*args):
        out = seen_fn(*args)
        masked.append(int(out.sum()))
        return out

    monkeypatch.setattr(beam_module, "_completes_seen_item", counting)
    codes = random_codes(n_items, seed=3)
    model = spread_weights(make_model(arch, n_layers=1, d_model=16, device=device, item_embedding=item_embedding,
                                      extra={"n_items": n_items}))
    batch = model_batch(make_batch(codes, 3, 5, 1, seed=2, device=device))
    allowed, item_of = brute_force_fns(codes)
    items, scores = generate(model, batch, allowed, item_of, beam, session_len, topk=beam)
    ref_items, ref_scores = reference_beam_search(model, batch, dict_trie(codes), beam, session_len, beam)
    assert torch.isfinite(scores[:, 0]).all()
    assert torch.equal(items.cpu(), ref_items)
    torch.testing.assert_close(scores.cpu(), ref_scores, atol=1e-5, rtol=1e-5)
    assert (sum(masked) > 0) == (session_len > 1)


def test_beam_search_runs_in_eval_mode_and_hands_back_the_callers_mode(monkeypatch):
    """Dropout off inside, the training mode restored after (also when the search fails); an eval
    model (serving) is never switched, since switching walks every submodule."""
    import onerec.model.beam as beam_module

    codes = random_codes(8)
    model = spread_weights(make_model("v2", n_layers=1, d_model=16, extra={"n_items": 8}))
    batch = model_batch(make_batch(codes, 2, 5, 1))
    allowed, item_of = brute_force_fns(codes)
    modes = []
    decode = model.decode
    monkeypatch.setattr(model, "decode", lambda *a, **kw: modes.append(model.training) or decode(*a, **kw))
    model.train()
    generate(model, batch, allowed, item_of, beam_size=3, session_len=1)
    assert model.training and modes and not any(modes)
    with pytest.raises(RuntimeError, match="broken trie"):
        generate(model, batch, lambda p: (_ for _ in ()).throw(RuntimeError("broken trie")), item_of, 3, 1)
    assert model.training
    model.eval()
    switched = []
    monkeypatch.setattr(type(model), "train", lambda self, mode=True: switched.append(mode) or self)
    beam_module.topk_next_items(model, batch, allowed, item_of, beam_size=4, k=2)
    assert not switched and not model.training


def test_topk_next_items_are_distinct_valid_and_ranked_by_model_probability():
    codes = random_codes(20, seed=4)
    model = spread_weights(make_model("v2", n_layers=1, d_model=16)).eval()
    batch = model_batch(make_batch(codes, 2, 5, 1, seed=5))
    allowed, item_of = brute_force_fns(codes)
    items, scores = topk_next_items(model, batch, allowed, item_of, beam_size=20, k=5)
    assert items.shape == (2, 5)
    # with beam >= number of items the search is exact: compare with scoring every item
    with torch.no_grad():
        memory = model.encode(batch)
        full = []
        for item in range(20):
            tgt = codes[item].expand(2, 1, 3)
            h, _ = model.decode(model.input_ids(tgt), memory)
            logp = sum(model.logits(h[:, l], l).log_softmax(-1)[:, codes[item, l]] for l in range(3))
            full.append(logp)
        best = torch.stack(full, 1).topk(5, dim=1)
    assert torch.equal(items, best.indices)
    torch.testing.assert_close(scores, best.values, atol=1e-5, rtol=1e-5)


def dense_model(arch: str = "v2", n_items: int = 12, attributes: bool = True, score_weight: float = 0.7,
                device: str = "cpu", repeat_gate: bool = True):
    """A spread-weight model with the dense head (and attribute vectors, and the repeat gate),
    its tables filled."""
    codes = random_codes(n_items, seed=3)
    g = torch.Generator().manual_seed(5)
    attrs = torch.randint(0, 5, (n_items + 1, 3), generator=g)                # 0 = none, 1..4
    attrs[0] = 0
    extra = {"n_items": n_items, **({"n_attributes": 4, "attribute_slots": 3} if attributes else {})}
    model = spread_weights(make_model(arch, n_layers=1, d_model=16, device=device, item_embedding=True,
                                      item_attributes=attributes, dense_loss_weight=1.0,
                                      dense_score_weight=score_weight, repeat_gate=repeat_gate, extra=extra))
    pad = torch.full((1, 3), -1)
    model.set_item_tables(item_codes=torch.cat([pad, codes]).to(device),
                          attributes=attrs.to(device) if attributes else None)
    return model, codes


def test_catalogue_vectors_are_reused_at_inference_until_a_weight_changes():
    model, _ = dense_model()
    with torch.no_grad():
        first = model.catalogue_vectors()
        assert model.catalogue_vectors() is first                                # reused
        torch.testing.assert_close(first, model._catalogue_vectors())
        model.context.item.weight.add_(1.0)                                      # e.g. an optimizer step
        second = model.catalogue_vectors()
    assert second is not first
    torch.testing.assert_close(second, first + 1.0)
    fresh = model.catalogue_vectors()                                            # with autograd: never cached
    assert fresh.requires_grad and fresh is not second


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch,attributes,repeat_gate", [("v1", False, False), ("v2", True, True),
                                                        ("v1", True, True), ("v2", False, False)])
def test_dense_rerank_matches_the_reference_and_changes_the_ranking(device, arch, attributes, repeat_gate):
    model, codes = dense_model(arch, attributes=attributes, device=device, repeat_gate=repeat_gate)
    batch = model_batch(make_batch(codes, 4, 5, 1, seed=2, device=device))
    allowed, item_of = brute_force_fns(codes)
    items, scores = topk_next_items(model, batch, allowed, item_of, beam_size=8, k=4)
    ref_items, ref_scores = reference_topk_next_items(model, batch, dict_trie(codes), beam_size=8, k=4)
    assert torch.equal(items.cpu(), ref_items)
    torch.testing.assert_close(scores.cpu(), ref_scores, atol=1e-4, rtol=1e-4)
    assert (scores[:, :-1] >= scores[:, 1:]).all()
    # independently of both: a returned item the beam also found scores its beam log-prob + w x
    # the head's log-softmax (trie row r = item index r + 1 = the head's column r)
    beam_items, beam_scores = generate(model, batch, allowed, item_of, 8, 1, topk=8)
    with torch.no_grad():
        head = model.head_logits(model.encode(batch)).log_softmax(-1)
    checked = 0
    for u, i in itertools.product(range(4), range(4)):
        hit = (beam_items[u, :, 0] == items[u, i]).nonzero()
        if len(hit):
            want = beam_scores[u, hit[0, 0]] + 0.7 * head[u, items[u, i]]
            torch.testing.assert_close(scores[u, i], want, atol=1e-4, rtol=1e-4)
            checked += 1
    assert checked > 0
    model.cfg = dataclasses.replace(model.cfg, dense_score_weight=0.0)        # the beam's own order
    plain, _ = topk_next_items(model, batch, allowed, item_of, beam_size=8, k=4)
    assert not torch.equal(plain, items)


def test_item_vectors_are_the_item_row_plus_the_mean_of_its_attribute_rows():
    model, _ = dense_model()
    table = model.context.attributes
    with torch.no_grad():
        for i in range(1, 13):
            attrs = [a for a in table[i].tolist() if a > 0]
            want = model.context.item.weight[i] + (model.context.attr.weight[attrs].mean(0) if attrs else 0)
            torch.testing.assert_close(model.context.item_vectors(torch.tensor(i)), want)


def test_the_repeat_gate_shifts_exactly_the_context_items_by_the_states_offset():
    model, codes = dense_model()
    batch = model_batch(make_batch(codes, 4, 5, 1, seed=6))
    with torch.no_grad():
        memory = model.encode(batch)
        h = model.bos_state(memory)
        gated = model.item_logits(h, memory)                                    # (4, 12)
        offset = model.repeat(h)                                                # (4, 1)
        model.repeat = None
        plain = model.item_logits(h, memory)
    seen = torch.zeros(4, 13, dtype=torch.bool).scatter_(1, batch["context_items"], True)[:, 1:]
    assert seen.any() and (~seen).any()
    torch.testing.assert_close(gated, plain + offset * seen)
    assert (offset.abs() > 1e-3).all()                                          # the test can see a shift
    with pytest.raises(ValueError, match="no 'context_items'"):
        dense_model()[0].item_logits(h, dataclasses.replace(memory, items=None))


def test_the_repeat_gate_learns_that_targets_never_repeat_the_context():
    """Targets are always items outside the context (Beauty's shape): the gate's offset goes
    well below zero, and the context's items fall below the rest in the head's ranking."""
    codes = random_codes(12, seed=3)
    model = make_model("v2", n_layers=1, d_model=32, item_embedding=True, dense_loss_weight=1.0,
                       repeat_gate=True, extra={"n_items": 12})
    model.set_item_tables(item_codes=torch.cat([torch.full((1, 3), -1), codes]))
    g = torch.Generator().manual_seed(2)
    ctx = torch.stack([torch.randperm(12, generator=g)[:6] for _ in range(64)])  # (64, 6) 0-based
    unseen = torch.stack([torch.tensor([i for i in range(12) if i not in row]) for row in ctx.tolist()])
    target = unseen.gather(1, torch.randint(0, 6, (64, 1), generator=g))         # (64, 1) never in context
    batch = {"context": codes[ctx], "context_items": ctx + 1, "context_mask": torch.ones(64, 6, dtype=torch.bool),
             "target": codes[target], "target_items": target + 1}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(150):
        _, loss, _ = model(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        memory = model.encode(batch)
        offset = model.repeat(model.bos_state(memory))
        logits = model.head_logits(memory)
    assert float(offset.max()) < 0 and float(offset.mean()) < -3.0
    in_ctx = logits.gather(1, ctx).max(1).values                                 # the best context item
    assert (in_ctx < logits.gather(1, unseen).max(1).values).all()


@pytest.mark.parametrize("arch", ["v1", "v2"])
def test_dense_head_learns_the_next_item_beside_the_token_loss(arch):
    codes = random_codes(12, seed=3)
    model = make_model(arch, n_layers=1, d_model=32, item_embedding=True, dense_loss_weight=1.0,
                       extra={"n_items": 12})
    model.set_item_tables(item_codes=torch.cat([torch.full((1, 3), -1), codes]))
    batch = make_batch(codes, 8, 5, 1, seed=1)
    batch["target_items"] = batch["target_items"] + 1                         # item indices 1..N
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        _, loss, parts = model(batch)
        loss.backward()
        opt.step()
    model.eval()
    _, loss, parts = model(batch)
    torch.testing.assert_close(loss, parts["ce"] + model.moe_aux_coef * parts["moe_aux"] + parts["item_ce"])
    assert parts["item_ce"] < 0.1
    with pytest.raises(ValueError, match="no 'target_items'"):
        model(model_batch(batch))


@pytest.mark.parametrize("arch", ["v1", "v2"])
def test_flops_count_the_dense_head(arch):
    plain = make_model(arch, d_model=16, item_embedding=True, extra={"n_items": 12})
    dense = make_model(arch, d_model=16, item_embedding=True, dense_loss_weight=1.0, extra={"n_items": 12})
    assert dense.flops_per_sample(8, 3) - plain.flops_per_sample(8, 3) == 2 * 16 * 16 + 2 * 16 * 12


def test_unset_or_misshapen_item_tables_are_clear_errors():
    codes = random_codes(12, seed=3)
    batch = make_batch(codes, 2, 5, 1)
    model = make_model("v2", item_embedding=True, item_attributes=True, dense_loss_weight=1.0,
                       extra={"n_items": 12, "n_attributes": 4, "attribute_slots": 3})
    with pytest.raises(ValueError, match="'item_codes' table is not set"):
        model(batch)
    with pytest.raises(ValueError, match=r"'item_codes' of shape \(13, 3\), got \(12, 3\)"):
        model.set_item_tables(item_codes=codes, attributes=torch.zeros(13, 3, dtype=torch.long))
    bad = torch.cat([torch.full((1, 3), -1), codes])
    bad[5, 1] = -1
    with pytest.raises(ValueError, match="rows 1..N must hold values in"):
        model.set_item_tables(item_codes=bad, attributes=torch.zeros(13, 3, dtype=torch.long))
    bad[5, 1] = SIZES[1]                                                       # beyond the codebook
    with pytest.raises(ValueError, match="rows 1..N must hold values in"):
        model.set_item_tables(item_codes=bad, attributes=torch.zeros(13, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="need model.item_embedding"):
        make_model("v2", dense_loss_weight=1.0)
    with pytest.raises(ValueError, match="config does not use it"):
        make_model("v2").set_item_tables(item_codes=codes)
    with pytest.raises(ValueError, match="needs n_attributes"):
        make_model("v2", item_embedding=True, item_attributes=True, extra={"n_items": 12})
    with pytest.raises(ValueError, match="no dense head"):
        make_model("v2").item_logits(torch.zeros(1, 32), None)


def test_saved_dense_model_loads_with_its_tables(tmp_path):
    from onerec.model.train import load_model, save_model

    model, codes = dense_model()
    batch = model_batch(make_batch(codes, 3, 5, 1, seed=4))
    save_model(model.eval(), tmp_path)
    clone, _ = load_model(tmp_path)
    assert torch.equal(clone.item_codes, model.item_codes)
    assert torch.equal(clone.context.attributes, model.context.attributes)
    allowed, item_of = brute_force_fns(codes)
    for a, b in zip(topk_next_items(model, batch, allowed, item_of, 8, 4),
                    topk_next_items(clone, batch, allowed, item_of, 8, 4)):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------- FLOPs, seeds, files


def test_flops_v2_below_v1_and_context_is_cheap_for_v2():
    v1, v2 = make_model("v1", n_layers=4), make_model("v2", n_layers=4)
    assert v2.flops_per_sample(500, 9) < v1.flops_per_sample(500, 9)
    assert v2.flops_per_sample(8, 9) < v1.flops_per_sample(8, 9)
    grow1 = v1.flops_per_sample(1000, 9) - v1.flops_per_sample(100, 9)
    grow2 = v2.flops_per_sample(1000, 9) - v2.flops_per_sample(100, 9)
    assert grow2 * 10 < grow1                                                  # V1 pays for the encoder
    assert isinstance(v1.flops_per_sample(10, 9), int) and v2.flops_per_sample(10, 9) > 0


@pytest.mark.parametrize("arch", ["v1", "v2"])
def test_same_seed_same_model_and_training(arch):
    codes = random_codes(30)
    batch = model_batch(make_batch(codes, 4, 6, 2))
    losses = []
    for _ in range(2):
        model = make_model(arch, seed=7, dropout=0.1)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        torch.manual_seed(11)
        run = []
        for _ in range(3):
            opt.zero_grad()
            loss = model(batch)[1]
            loss.backward()
            opt.step()
            run.append(loss.item())
        losses.append(run)
    assert losses[0] == losses[1]
    a, b, c = (make_model(arch, seed=s).state_dict() for s in (7, 7, 8))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("arch,item_embedding", [("v1", False), ("v2", False), ("v2", True)])
def test_safetensors_round_trip_gives_identical_outputs(arch, item_embedding, tmp_path):
    codes = random_codes(30)
    batch = model_batch(make_batch(codes, 3, 6, 2))
    model = make_model(arch, seed=3, item_embedding=item_embedding, extra={"n_items": 30}).eval()
    save_file(model.state_dict(), tmp_path / "model.safetensors")
    hp = model.hparams
    clone = build_model(ModelConfig(**hp["cfg"]), **hp["extra"])
    clone.load_state_dict(load_file(tmp_path / "model.safetensors"))
    clone.eval()
    with torch.no_grad():
        for a, b in zip(model(batch)[0], clone(batch)[0]):
            assert torch.equal(a, b)
    assert type(clone) is (OneRecV1 if arch == "v1" else OneRecV2)


def test_clear_errors_for_bad_knobs_and_batches():
    with pytest.raises(ValueError, match="codebook_sizes is required"):
        build_model(model_config("v2"))
    with pytest.raises(ValueError, match="must divide n_heads"):
        build_model(model_config("v2"), codebook_sizes=SIZES, n_kv_heads=3)
    with pytest.raises(ValueError, match="v1 only"):
        build_model(model_config("v2"), codebook_sizes=SIZES, n_encoder_layers=2)
    codes = random_codes(30)
    batch = model_batch(make_batch(codes, 2, 6, 1))
    with pytest.raises(ValueError, match="no 'side'"):
        make_model("v2", extra={"n_side_features": 2})(batch)
    with pytest.raises(ValueError, match="max_seq_len"):
        make_model("v1", max_seq_len=4)(batch)


@pytest.mark.parametrize("arch", ["v1", "v2"])
def test_item_embedding_tells_items_apart_that_codes_alone_cannot(arch):
    """With model.item_embedding the context's item indices change the outputs; without it only
    the codes do (so two items sharing every level embedding would look alike)."""
    codes = random_codes(30)
    batch = model_batch(make_batch(codes, 3, 6, 2))
    other_items = dict(batch, context_items=torch.where(batch["context_mask"], 31 - batch["context_items"], 0))
    with_items = spread_weights(make_model(arch, item_embedding=True, extra={"n_items": 30})).eval()
    plain = spread_weights(make_model(arch)).eval()
    with torch.no_grad():
        assert not torch.allclose(with_items(batch)[0][0], with_items(other_items)[0][0])
        assert torch.equal(plain(batch)[0][0], plain(other_items)[0][0])
        padded = dict(batch, context_items=torch.where(batch["context_mask"], batch["context_items"], 7))
        torch.testing.assert_close(with_items(padded)[0][0], with_items(batch)[0][0])  # padding is masked
    assert with_items.num_params() - plain.num_params() == 31 * 32                  # N + 1 rows of d_model
    with pytest.raises(ValueError, match="no 'context_items'"):
        with_items({k: v for k, v in batch.items() if k != "context_items"})
    with pytest.raises(ValueError, match="item_embedding needs n_items"):
        make_model(arch, item_embedding=True)


@pytest.mark.parametrize("arch", ["v1", "v2"])
def test_items_forced_along_the_beams_score_their_teacher_forced_log_prob(arch):
    from onerec.model.beam import _decode_bos, _search, context_only, item_logp

    model, codes = dense_model(arch)
    batch = model_batch(make_batch(codes, 3, 5, 1, seed=4))
    allowed, item_of = brute_force_fns(codes)
    forced = codes[torch.randint(len(codes), (3, 5), generator=torch.Generator().manual_seed(0))]  # (B, C, L)
    with torch.no_grad():
        memory = model.eval().encode(context_only(batch))
        cache, h_bos = _decode_bos(model, memory)
        items, scores, forced_logp = _search(model, memory, cache, h_bos, allowed, item_of, 6, 1, 6, forced=forced)
        torch.testing.assert_close(forced_logp, item_logp(model, memory, forced), atol=1e-5, rtol=1e-5)
        plain_items, plain_scores = generate(model, batch, allowed, item_of, 6, 1)    # the beams do not change
        assert torch.equal(items, plain_items)
        torch.testing.assert_close(scores, plain_scores)
        with pytest.raises(ValueError, match="session of one item"):
            _search(model, memory, *_decode_bos(model, memory), allowed, item_of, 6, 2, 6, forced=forced)


@pytest.mark.parametrize("arch", ["v1", "v2"])
def test_a_narrow_beam_beside_more_head_items_matches_the_reference(arch):
    """The hybrid's head items are their own knob (head_k): k may exceed the beams then."""
    model, codes = dense_model(arch)
    batch = model_batch(make_batch(codes, 4, 5, 1, seed=3))
    allowed, item_of = brute_force_fns(codes)
    items, scores = topk_next_items(model, batch, allowed, item_of, beam_size=2, k=5, head_k=6)
    ref_items, ref_scores = reference_topk_next_items(model, batch, dict_trie(codes), beam_size=2, k=5, head_k=6)
    assert torch.equal(items, ref_items) and (items >= 0).all()
    assert all(len(set(row.tolist())) == 5 for row in items)
    torch.testing.assert_close(scores, ref_scores, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="head_k"):
        topk_next_items(model, batch, allowed, item_of, beam_size=2, k=7, head_k=6)
