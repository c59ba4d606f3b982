"""Semantic-ID tokenizer: embeddings, balanced RQ-KMeans, save/load, prefix trie."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from onerec.data import load_movielens_100k
from onerec.tokenizer import (
    CodeTrie,
    DictTrie,
    SemanticIdTokenizer,
    TokenizerError,
    balanced_assign,
    balanced_assign_reference,
    item_embeddings,
    scaled_codebook_size,
)
from onerec.tokenizer.rqkmeans import META_FILE, TENSORS_FILE
from tests.conftest import data_root

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def ml():
    return load_movielens_100k(data_root())


@pytest.fixture(scope="module")
def ml_emb(ml):
    return item_embeddings(ml.interactions, ml.items, dim=64, seed=0)


@pytest.fixture(scope="module")
def ml_tok(ml_emb):
    item_ids, emb = ml_emb
    return SemanticIdTokenizer.fit(item_ids, emb, levels=3, codebook_size=8192, seed=0)


def blobs(n: int = 300, dim: int = 8, centres: int = 6, seed: int = 0):
    """Gaussian blobs with shuffled, non-contiguous item ids."""
    rng = np.random.default_rng(seed)
    mu = rng.normal(size=(centres, dim)) * 3
    emb = mu[rng.integers(centres, size=n)] + rng.normal(size=(n, dim))
    item_ids = rng.permutation(np.arange(n) * 7 + 100)
    return item_ids, emb.astype(np.float32)


@pytest.fixture(scope="module")
def syn_tok():
    item_ids, emb = blobs()
    return SemanticIdTokenizer.fit(item_ids, emb, levels=3, codebook_size=64, seed=0)


def fitted_parts(tok: SemanticIdTokenizer, emb_by_id: dict[int, np.ndarray]):
    emb = np.stack([emb_by_id[int(i)] for i in tok.item_ids]).astype(np.float64)
    recon = sum(c[tok.codes[:, l]].astype(np.float64) for l, c in enumerate(tok.centroids))
    return emb, recon


# --------------------------------------------------------------------------- embeddings

def test_embeddings_cover_catalogue_and_are_normalized(ml, ml_emb):
    item_ids, emb = ml_emb
    assert emb.shape == (1682, 64) and emb.dtype == np.float32
    assert np.array_equal(item_ids, np.sort(ml.items["item_id"].to_numpy()))
    assert np.isfinite(emb).all()
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)  # both parts present


def test_embeddings_deterministic(ml, ml_emb):
    again = item_embeddings(ml.interactions, ml.items, dim=64, seed=0)
    assert np.array_equal(ml_emb[0], again[0]) and np.array_equal(ml_emb[1], again[1])


def test_embeddings_put_sequels_together(ml_emb):
    """Collaborative signal works: Return of the Jedi (181) is among Star Wars' (50) 5 nearest."""
    item_ids, emb = ml_emb
    star_wars = np.searchsorted(item_ids, 50)
    nearest = item_ids[np.argsort(-(emb @ emb[star_wars]))[1:6]]
    assert 181 in nearest, nearest


def test_embeddings_cold_items_get_side_features_only():
    items = pd.DataFrame({"item_id": [10, 20, 30, 40, 50],
                          "genres": [[0, 1], [1], [0, 2], [2], [0, 1]]})
    seq = [10, 20, 30, 40, 20, 10, 40, 30]  # item 50 never appears
    inter = pd.DataFrame({"user_id": [1] * 4 + [2] * 4, "item_id": seq, "timestamp": list(range(8))})
    ids, emb = item_embeddings(inter, items, dim=6, side_dim=2, side_weight=0.3, window=2)
    assert np.array_equal(ids, [10, 20, 30, 40, 50]) and emb.shape == (5, 6)
    cold = emb[4]
    assert np.allclose(cold[:4], 0.0) and np.isclose(np.linalg.norm(cold), math.sqrt(0.3), atol=1e-5)
    # 50 has the same genres as 10, so the same side part.
    np.testing.assert_allclose(cold[4:], emb[0][4:], atol=1e-6)

    inter.loc[0, "item_id"] = 99
    with pytest.raises(ValueError, match="item_id 99"):
        item_embeddings(inter, items, dim=6)


def test_embeddings_without_side_features():
    items = pd.DataFrame({"item_id": np.arange(30)})
    rng = np.random.default_rng(0)
    inter = pd.DataFrame({"user_id": np.repeat(np.arange(20), 10),
                          "item_id": rng.integers(30, size=200), "timestamp": np.tile(np.arange(10), 20)})
    _, emb = item_embeddings(inter, items, dim=8)
    assert emb.shape == (30, 8)
    norms = np.linalg.norm(emb, axis=1)
    assert np.all((np.abs(norms - 1) < 1e-5) | (norms == 0))


# --------------------------------------------------------------------------- codebook size rule

@pytest.mark.parametrize("n, levels, cap, scale, expected", [
    (1682, 3, 8192, 1.0, 12),     # 11.89 -> 12
    (1682, 3, 8192, 2.0, 24),     # 23.79 -> 24
    (12101, 3, 8192, 1.0, 24),    # 22.96 -> 23 -> even 24
    (12101, 3, 8192, 2.0, 46),    # 45.92 -> 46
    (1000, 3, 8192, 1.0, 10),     # exactly 10: float error must not round up
    (1682, 3, 16, 2.0, 16),       # capped by codebook_size (debug preset)
    (5, 3, 8192, 2.0, 4),         # 3.42 -> 4
    (3, 2, 8192, 4.0, 3),         # never more clusters than items
    (1, 3, 8192, 2.0, 1),
])
def test_scaled_codebook_size(n, levels, cap, scale, expected):
    assert scaled_codebook_size(n, levels, cap, scale) == expected


def test_fit_follows_scaling_rule(ml_tok, syn_tok):
    assert ml_tok.codebook_sizes[:3] == [scaled_codebook_size(1682, 3, 8192)] * 3 == [24] * 3
    assert syn_tok.codebook_sizes[:3] == [scaled_codebook_size(300, 3, 64)] * 3
    for tok in (ml_tok, syn_tok):  # the last size is the largest collision bucket
        assert tok.codebook_sizes[-1] == tok.report()["max_bucket_size"] == tok.codes[:, -1].max() + 1


# --------------------------------------------------------------------------- balanced assignment

@pytest.mark.parametrize("seed", range(6))
def test_balanced_assign_matches_reference(seed):
    rng = np.random.default_rng(seed)
    n, k = int(rng.integers(1, 80)), int(rng.integers(1, 9))
    cap = -(-n // k) + int(rng.integers(0, 3))  # exact capacity and some slack
    cost = rng.random((n, k)) if seed % 2 else rng.integers(0, 4, size=(n, k)).astype(float)  # ties
    fast, ref = balanced_assign(cost, cap), balanced_assign_reference(cost, cap)
    assert np.array_equal(fast, ref)
    assert fast.min() >= 0 and np.bincount(fast, minlength=k).max() <= cap


def test_balanced_assign_is_stable_matching():
    """No item and cluster both prefer each other over what they got (the defining property)."""
    rng = np.random.default_rng(7)
    cost = rng.random((60, 5))
    a = balanced_assign(cost, 12)
    for i in range(60):
        for j in range(5):
            if cost[i, j] < cost[i, a[i]]:  # i would rather be in j: j must be full of better items
                members = np.flatnonzero(a == j)
                assert len(members) == 12 and cost[members, j].max() < cost[i, j]


def test_balanced_assign_rejects_too_small_capacity():
    with pytest.raises(ValueError, match="cannot hold"):
        balanced_assign(np.zeros((10, 3)), 3)


# --------------------------------------------------------------------------- fitting

@pytest.mark.parametrize("name", ["ml", "syn"])
def test_every_item_has_unique_code(name, ml_tok, syn_tok):
    tok = ml_tok if name == "ml" else syn_tok
    n = len(tok.item_ids)
    assert tok.codes.shape == (n, 4) and tok.codes.dtype == np.int64
    assert len(np.unique(tok.codes, axis=0)) == n
    assert ((tok.codes >= 0) & (tok.codes < np.array(tok.codebook_sizes))).all()
    assert np.array_equal(tok.decode(tok.codes), tok.item_ids)


@pytest.mark.parametrize("name, max_ratio", [("ml", 1.3), ("syn", 1.6)])
def test_clusters_are_balanced(name, max_ratio, ml_tok, syn_tok):
    """At most ceil(N/K) per cluster, so at least N - (K-1) ceil(N/K) (the slack K ceil(N/K) - N
    < K can all fall on one cluster: 14 of 22 for the blobs' N=300, K=14)."""
    tok = ml_tok if name == "ml" else syn_tok
    n = len(tok.item_ids)
    for level in range(3):
        k = tok.codebook_sizes[level]
        cap = math.ceil(n / k)
        sizes = np.bincount(tok.codes[:, level], minlength=k)
        assert sizes.max() <= cap and sizes.min() >= n - (k - 1) * cap, (level, sizes)
        assert sizes.max() / sizes.min() <= max_ratio, (level, sizes)


def test_unbalanced_data_is_still_balanced():
    """90% of the items in one tight blob: plain k-means would give that blob most codes' items."""
    rng = np.random.default_rng(0)
    emb = np.concatenate([rng.normal(size=(270, 4)) * 0.01, rng.normal(size=(30, 4)) * 5 + 20])
    tok = SemanticIdTokenizer.fit(np.arange(300), emb, levels=2, codebook_size=64, scale=1.0)
    k = tok.codebook_sizes[0]
    assert np.bincount(tok.codes[:, 0], minlength=k).max() <= math.ceil(300 / k)


def test_report_is_sane(ml_tok, ml_emb):
    r = ml_tok.report()
    n = 1682
    assert r["n_items"] == n and r["levels"] == 3 and r["codebook_sizes"] == ml_tok.codebook_sizes
    assert len(r["utilization"]) == 4 and all(0 < u <= 1 for u in r["utilization"])
    assert r["recon_mse"] >= 0 and r["recon_mse"] < r["baseline_mse"]
    losses = r["recon_mse_per_level"]
    assert len(losses) == 3 and losses[0] > losses[1] > losses[2] == r["recon_mse"]
    emb, recon = fitted_parts(ml_tok, dict(zip(*ml_emb)))
    assert np.isclose(r["recon_mse"], ((emb - recon) ** 2).mean(), rtol=1e-6)
    # collisions as the report says: recount them from the codes
    _, counts = np.unique(ml_tok.codes[:, :3], axis=0, return_counts=True)
    assert np.isclose(r["collision_rate"], 1 - len(counts) / n)
    assert 0 <= r["collision_rate"] < 0.5 and r["max_bucket_size"] == counts.max()
    assert r["colliding_items"] == counts[counts > 1].sum()
    assert r["cluster_size_max"] == [r["capacity"]] * 3


def test_more_levels_reconstruct_better_than_one(ml_emb, ml_tok):
    one = SemanticIdTokenizer.fit(*ml_emb, levels=1, codebook_size=24, scale=1.0)
    assert one.codebook_sizes[0] == 24  # same codebook size as each of ml_tok's levels
    assert ml_tok.report()["recon_mse"] < 0.8 * one.report()["recon_mse"]
    assert ml_tok.report()["relative_error"] < 0.45  # 0.36 when written


def test_balance_costs_little_reconstruction(ml_emb):
    """One balanced level explains nearly as much variance as plain (unbalanced) k-means:
    0.61 vs 0.59 of the variance left when written; a random balanced partition leaves 0.99."""
    from sklearn.cluster import KMeans

    emb = ml_emb[1].astype(np.float64)
    variance = ((emb - emb.mean(axis=0)) ** 2).mean()
    one = SemanticIdTokenizer.fit(*ml_emb, levels=1, codebook_size=24, scale=1.0)
    plain = KMeans(24, n_init=1, random_state=0).fit(emb).inertia_ / emb.size
    assert one.report()["recon_mse"] < min(0.7 * variance, 1.1 * plain)


def test_disambiguation_ranks_by_reconstruction_error(syn_tok):
    item_ids, emb = blobs()
    emb, recon = fitted_parts(syn_tok, dict(zip(item_ids, emb)))
    error = ((emb - recon) ** 2).sum(axis=1)
    _, bucket = np.unique(syn_tok.codes[:, :3], axis=0, return_inverse=True)
    bucket = bucket.ravel()
    for b in np.unique(bucket):
        members = np.flatnonzero(bucket == b)
        ranks = syn_tok.codes[members, 3]
        assert sorted(ranks) == list(range(len(members)))
        assert (np.diff(error[members[np.argsort(ranks)]]) >= 0).all()


def test_fit_is_deterministic_and_order_free(syn_tok):
    item_ids, emb = blobs()
    again = SemanticIdTokenizer.fit(item_ids, emb, levels=3, codebook_size=64, seed=0)
    assert np.array_equal(again.codes, syn_tok.codes)
    perm = np.random.default_rng(1).permutation(len(item_ids))
    shuffled = SemanticIdTokenizer.fit(item_ids[perm], emb[perm], levels=3, codebook_size=64, seed=0)
    assert np.array_equal(shuffled.item_ids, syn_tok.item_ids)
    other = SemanticIdTokenizer.fit(item_ids, emb, levels=3, codebook_size=64, seed=1)
    assert not np.array_equal(other.codes, syn_tok.codes)


def test_fit_rejects_bad_input():
    with pytest.raises(ValueError, match="duplicates"):
        SemanticIdTokenizer.fit([1, 1], np.zeros((2, 3)))
    with pytest.raises(ValueError, match="NaN"):
        SemanticIdTokenizer.fit([1, 2], np.array([[0.0, np.nan], [1.0, 1.0]]))
    with pytest.raises(ValueError, match="shapes"):
        SemanticIdTokenizer.fit([1, 2, 3], np.zeros((2, 3)))


def test_encode_decode(ml_tok):
    ids = np.array([50, 181, 1, 1682])
    codes = ml_tok.encode(ids)
    assert codes.shape == (4, 4)
    assert np.array_equal(ml_tok.decode(codes), ids)
    with pytest.raises(TokenizerError, match="unknown item id.*99999"):
        ml_tok.encode([50, 99999])
    bad = codes.copy()
    bad[0, 0] = ml_tok.codebook_sizes[0]      # out of range
    bad[1, 3] = -1                            # negative
    bad[2, 3] = ml_tok.codebook_sizes[3] - 1  # in range, but probably nobody's code
    expected = -1 if not (ml_tok.codes == bad[2]).all(axis=1).any() else ml_tok.decode(bad[2:3])[0]
    assert ml_tok.decode(bad).tolist() == [-1, -1, expected, 1682]


# --------------------------------------------------------------------------- save / load

def test_save_load_round_trip(ml_tok, tmp_path):
    ml_tok.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([TENSORS_FILE, META_FILE])
    back = SemanticIdTokenizer.load(tmp_path)
    assert np.array_equal(back.codes, ml_tok.codes) and np.array_equal(back.item_ids, ml_tok.item_ids)
    assert back.codebook_sizes == ml_tok.codebook_sizes and back.levels == 3
    for a, b in zip(back.centroids, ml_tok.centroids):
        assert np.array_equal(a, b)
    assert back.report() == ml_tok.report()
    assert np.array_equal(back.encode([50, 7]), ml_tok.encode([50, 7]))


def _saved(tok, tmp_path):
    tok.save(tmp_path)
    return tmp_path / TENSORS_FILE, tmp_path / META_FILE


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupted_safetensors_names_the_file(syn_tok, tmp_path, damage):
    tensors, _ = _saved(syn_tok, tmp_path)
    data = tensors.read_bytes()
    tensors.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x00\xff" * 64,
                         "empty": b""}[damage])
    with pytest.raises(TokenizerError, match=TENSORS_FILE):
        SemanticIdTokenizer.load(tmp_path)


def test_tensor_values_are_validated(syn_tok, tmp_path):
    from safetensors.numpy import load_file, save_file

    tensors, _ = _saved(syn_tok, tmp_path)
    for name, change, message in [
        ("codes", lambda t: np.concatenate([t[:1], t[:-1]]), "duplicate rows"),
        ("codes", lambda t: t * 0 + 999, "outside the codebook"),
        ("item_ids", lambda t: t[::-1].copy(), "strictly increasing"),
        ("centroids.1", lambda t: t[:-1].copy(), "centroids.1"),
        ("codes", lambda t: t.astype(np.int32), "int32"),
    ]:
        syn_tok.save(tmp_path)
        data = load_file(str(tensors))
        data[name] = change(data[name])
        save_file(data, str(tensors))
        with pytest.raises(TokenizerError, match=message) as err:
            SemanticIdTokenizer.load(tmp_path)
        assert TENSORS_FILE in str(err.value)


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.update(levels=2), "levels"),
    (lambda m: m.update(n_items=m["n_items"] + 1), "item"),
    (lambda m: m.update(codebook_sizes=m["codebook_sizes"][:-1]), "codebook_sizes"),
    (lambda m: m["codebook_sizes"].__setitem__(0, 5), "centroids.0"),
    (lambda m: m.update(dim=3), "centroids"),
    (lambda m: m.update(version=99), "version"),
    (lambda m: m.update(format="pickle"), "format"),
    (lambda m: m.update(codebook_sizes=[2 ** 21] * 4), "2\\^62"),
])
def test_mismatched_json_names_the_file(syn_tok, tmp_path, edit, message):
    _, meta_path = _saved(syn_tok, tmp_path)
    meta = json.loads(meta_path.read_text())
    edit(meta)
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(TokenizerError, match=message) as err:
        SemanticIdTokenizer.load(tmp_path)
    assert META_FILE in str(err.value)


def test_bad_or_missing_json(syn_tok, tmp_path):
    _, meta_path = _saved(syn_tok, tmp_path)
    meta_path.write_text("{not json")
    with pytest.raises(TokenizerError, match=f"{META_FILE}: not valid JSON"):
        SemanticIdTokenizer.load(tmp_path)
    meta_path.unlink()
    with pytest.raises(TokenizerError, match=f"{META_FILE}: file not found"):
        SemanticIdTokenizer.load(tmp_path)


# --------------------------------------------------------------------------- trie

def random_codes(seed: int) -> tuple[torch.Tensor, list[int]]:
    """Unique random codes over small codebooks, so prefixes are shared and some are missing."""
    g = torch.Generator().manual_seed(seed)
    levels = int(torch.randint(2, 5, (1,), generator=g))
    sizes = torch.randint(2, 7, (levels,), generator=g).tolist()
    n = max(1, math.prod(sizes) // 3)
    keys = torch.randperm(math.prod(sizes), generator=g)[:n]  # distinct codes as mixed-radix keys
    codes = torch.zeros(n, levels, dtype=torch.int64)
    for l in reversed(range(levels)):
        codes[:, l] = keys % sizes[l]
        keys = keys // sizes[l]
    return codes, sizes


def probe_codes(codes: torch.Tensor, sizes: list[int], seed: int) -> torch.Tensor:
    """Valid codes, random (mostly invalid) in-range codes and out-of-range tokens; (B, L)."""
    g = torch.Generator().manual_seed(seed + 1000)
    n, levels = codes.shape
    valid = codes[torch.randint(n, (64,), generator=g)]
    random = torch.stack([torch.randint(s, (64,), generator=g) for s in sizes], dim=1)
    wild = torch.randint(-2, max(sizes) + 2, (64, levels), generator=g)
    return torch.cat([valid, random, wild])


def tries(codes, sizes, device="cpu"):
    return {"dense": CodeTrie.from_codes(codes, sizes).to(device),
            "csr": CodeTrie.from_codes(codes, sizes, dense_max_bytes=0).to(device)}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", range(8))
def test_trie_matches_dict_reference(seed, device):
    codes, sizes = random_codes(seed)
    ref = DictTrie.from_codes(codes, sizes)
    probes = probe_codes(codes, sizes, seed)
    for kind, trie in tries(codes, sizes, device).items():
        assert (trie.masks[1] is None) == (kind == "csr")
        for l in range(codes.shape[1]):
            got = trie.allowed(probes[:, :l].to(device))
            assert got.device.type == device and got.shape == (len(probes), sizes[l])
            assert torch.equal(got.cpu(), ref.allowed(probes[:, :l])), (kind, l)
        assert torch.equal(trie.item_of(probes.to(device)).cpu(), ref.item_of(probes)), kind


def test_trie_on_tokenizer_codes(ml_tok):
    codes = torch.from_numpy(ml_tok.codes)
    ref = DictTrie.from_codes(codes, ml_tok.codebook_sizes)
    probes = probe_codes(codes, ml_tok.codebook_sizes, 0)
    for kind, trie in tries(codes, ml_tok.codebook_sizes).items():
        assert torch.equal(trie.item_of(codes), torch.arange(len(codes))), kind
        for l in range(4):
            assert torch.equal(trie.allowed(probes[:, :l]), ref.allowed(probes[:, :l])), (kind, l)
        # the root allows exactly the level-0 codes in use; nothing extends an unknown prefix
        assert trie.allowed(torch.zeros(1, 0, dtype=torch.int64)).sum() == ml_tok.codebook_sizes[0]
    trie = ml_tok.trie()
    assert trie.nbytes() < 2 ** 20
    rows = trie.item_of(torch.from_numpy(ml_tok.encode([50, 181])))
    assert ml_tok.item_ids[rows.numpy()].tolist() == [50, 181]


def test_trie_allowed_is_one_level_down():
    """Every allowed token extends the prefix to a prefix of some code, and only those."""
    codes = torch.tensor([[0, 1, 0], [0, 1, 1], [2, 0, 0], [1, 1, 0]])
    trie = CodeTrie.from_codes(codes, [3, 2, 2])
    assert trie.allowed(torch.zeros(1, 0, dtype=torch.int64)).tolist() == [[True, True, True]]
    assert trie.allowed(torch.tensor([[0], [2], [1]])).tolist() == [[False, True], [True, False],
                                                                    [False, True]]
    assert trie.allowed(torch.tensor([[0, 1], [0, 0], [5, 0]])).tolist() == [[True, True],
                                                                           [False, False],
                                                                           [False, False]]
    assert trie.item_of(torch.tensor([[1, 1, 0], [1, 1, 1], [0, 1, 1]])).tolist() == [3, -1, 1]


def test_trie_rejects_bad_input():
    with pytest.raises(ValueError, match="duplicate"):
        CodeTrie.from_codes(torch.tensor([[0, 1], [0, 1]]))
    with pytest.raises(ValueError, match="outside"):
        CodeTrie.from_codes(torch.tensor([[0, 3]]), sizes=[2, 2])
    trie = CodeTrie.from_codes(torch.tensor([[0, 1], [1, 0]]))
    with pytest.raises(ValueError, match="0 <= l < 2"):
        trie.allowed(torch.zeros(1, 2, dtype=torch.int64))
