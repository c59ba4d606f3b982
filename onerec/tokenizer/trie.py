"""Prefix trie of valid semantic IDs, as tensors, for constrained beam search.

    trie = CodeTrie.from_codes(codes, sizes=tok.codebook_sizes)   # codes (N, L) LongTensor
    mask = trie.allowed(prefixes)     # (B, l) -> (B, K_l) bool: tokens that keep a prefix valid
    idx = trie.item_of(full_codes)    # (B, L) -> (B,) row of `codes`, -1 if no item has that code

Representation (per depth l = 0..L-1; nothing loops over the batch):
- a prefix of length l is one int64 key, its tokens read as a mixed-radix number
  (key = (..(t_0 * K_1 + t_1) * K_2 + ..) + t_{l-1}); exact, not a hash, so the code space
  prod(K_l) must stay below 2^62 (8192^3 x a bucket of 2^22 does);
- `node_keys[l]`: the sorted keys of the prefixes that exist, (M_l,); a batch of prefixes finds its
  node ids with one `torch.searchsorted`;
- the children of each node, either
  dense: a (M_l, K_l) bool mask, one gather per query, M_l * K_l bytes; used when that is at most
  `dense_max_bytes` (default 64 MiB); the whole trie is 60 KB for ml-100k, 1 MB for Beauty;
  or CSR: `child_ptr[l]` (M_l + 1,) offsets into `child_tokens[l]` (E_l,) sorted tokens, memory
  O(edges) = at most N per level; the query scatters the children of each row into the output
  (`repeat_interleave`, which syncs a GPU once per call for the output size). Needed at the
  paper's scale: 10^7 items with K = 8192 would make a dense depth-2 mask ~80 GB.
- full codes: `leaf_keys` (N,) sorted with `leaf_items` (N,), the row of each code in `codes`.

`DictTrie` is the plain reference (nested dicts, Python loops) with the same API; the tests
check that both agree on random valid and invalid prefixes.
"""
from __future__ import annotations

import math

import torch

DENSE_MAX_BYTES = 64 * 2 ** 20


def _check_codes(codes: torch.Tensor, sizes) -> list[int]:
    if codes.dim() != 2 or codes.shape[0] == 0 or codes.shape[1] == 0:
        raise ValueError(f"codes must be a non-empty (N, L) tensor, got shape {tuple(codes.shape)}")
    if codes.dtype != torch.int64:
        raise ValueError(f"codes must be int64 (LongTensor), got {codes.dtype}")
    if sizes is None:
        sizes = (codes.max(dim=0).values + 1).tolist()
    sizes = [int(s) for s in sizes]
    if len(sizes) != codes.shape[1]:
        raise ValueError(f"{len(sizes)} sizes for codes with {codes.shape[1]} levels")
    limits = torch.tensor(sizes, device=codes.device)
    if bool(((codes < 0) | (codes >= limits)).any()):
        raise ValueError(f"codes outside the codebook sizes {sizes}")
    if math.prod(sizes) >= 2 ** 62:
        raise ValueError(f"codebook sizes {sizes}: the code space exceeds 2^62 keys")
    return sizes


class CodeTrie:
    """Tensorized prefix trie; build with `from_codes`, move with `to(device)`."""

    def __init__(self, sizes, node_keys, masks, child_ptr, child_tokens, leaf_keys, leaf_items):
        self.sizes = list(sizes)                # K_l per level, (L,)
        self.levels = len(self.sizes)
        self.node_keys = node_keys              # L x (M_l,) sorted prefix keys at depth l
        self.masks = masks                      # L x ((M_l, K_l) bool or None when CSR)
        self.child_ptr = child_ptr              # L x ((M_l + 1,) or None when dense)
        self.child_tokens = child_tokens        # L x ((E_l,) or None when dense)
        self.leaf_keys = leaf_keys              # (N,) sorted full-code keys
        self.leaf_items = leaf_items            # (N,) row in the original codes
        self._limits = torch.tensor(self.sizes, device=leaf_keys.device)  # (L,)

    @classmethod
    def from_codes(cls, codes: torch.Tensor, sizes=None, dense_max_bytes: int = DENSE_MAX_BYTES
                   ) -> CodeTrie:
        """codes (N, L) int64, unique rows; sizes: K_l per level (default: max code + 1)."""
        sizes = _check_codes(codes, sizes)
        n = codes.shape[0]
        node_keys, masks, child_ptr, child_tokens = [], [], [], []
        parent = torch.zeros(n, dtype=torch.int64, device=codes.device)  # (N,) key of each prefix
        for l, k in enumerate(sizes):
            keys = torch.unique(parent)                                   # (M_l,) sorted
            node = torch.searchsorted(keys, parent)                       # (N,) node of each item
            edges = torch.unique(node * k + codes[:, l])                  # (E_l,) sorted (node, token)
            edge_node, edge_token = edges // k, edges % k
            node_keys.append(keys)
            if len(keys) * k <= dense_max_bytes:
                mask = torch.zeros(len(keys), k, dtype=torch.bool, device=codes.device)
                mask[edge_node, edge_token] = True                         # (M_l, K_l)
                masks.append(mask)
                child_ptr.append(None)
                child_tokens.append(None)
            else:
                counts = torch.bincount(edge_node, minlength=len(keys))   # (M_l,)
                ptr = torch.zeros(len(keys) + 1, dtype=torch.int64, device=codes.device)
                ptr[1:] = torch.cumsum(counts, dim=0)
                masks.append(None)
                child_ptr.append(ptr)
                child_tokens.append(edge_token)                           # sorted by (node, token)
            parent = parent * k + codes[:, l]
        leaf_keys, leaf_items = torch.sort(parent)
        if len(leaf_keys) > 1 and bool((leaf_keys[1:] == leaf_keys[:-1]).any()):
            raise ValueError("codes has duplicate rows; item_of needs one item per code")
        return cls(sizes, node_keys, masks, child_ptr, child_tokens, leaf_keys, leaf_items)

    def to(self, device) -> CodeTrie:
        move = lambda xs: [None if x is None else x.to(device) for x in xs]
        return CodeTrie(self.sizes, move(self.node_keys), move(self.masks), move(self.child_ptr),
                        move(self.child_tokens), self.leaf_keys.to(device), self.leaf_items.to(device))

    @property
    def device(self) -> torch.device:
        return self.leaf_keys.device

    def nbytes(self) -> int:
        """Memory held by the trie's tensors."""
        tensors = [self.leaf_keys, self.leaf_items, *self.node_keys, *self.masks, *self.child_ptr,
                   *self.child_tokens]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    # ---------------------------------------------------------------- lookups

    def _keys(self, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, l) -> (key (B,), in_range (B,)); the key is meaningless where not in range."""
        b, l = codes.shape
        in_range = ((codes >= 0) & (codes < self._limits[:l])).all(dim=1)  # (B,)
        key = torch.zeros(b, dtype=torch.int64, device=codes.device)
        for j in range(l):  # a loop over levels (<= L), not over the batch
            key = key * self.sizes[j] + codes[:, j]
        return key, in_range

    @staticmethod
    def _find(sorted_keys: torch.Tensor, key: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
        """Index of each key in `sorted_keys`, -1 where absent or not ok; (B,) -> (B,)."""
        pos = torch.searchsorted(sorted_keys, key).clamp(max=len(sorted_keys) - 1)
        found = ok & (sorted_keys[pos] == key)
        return torch.where(found, pos, torch.full_like(pos, -1))

    def allowed(self, prefixes: torch.Tensor) -> torch.Tensor:
        """prefixes (B, l), 0 <= l < L, int64 -> (B, K_l) bool: next tokens that some item's code
        continues with. A prefix that no item has (or out of range) allows nothing."""
        if prefixes.dim() != 2 or not 0 <= prefixes.shape[1] < self.levels:
            raise ValueError(f"prefixes must be (B, l) with 0 <= l < {self.levels}, "
                             f"got shape {tuple(prefixes.shape)}")
        b, l = prefixes.shape
        key, in_range = self._keys(prefixes)
        node = self._find(self.node_keys[l], key, in_range)                # (B,) -1: no such node
        valid = node >= 0
        if self.masks[l] is not None:                                      # dense: one gather
            return self.masks[l][node.clamp(min=0)] & valid[:, None]       # (B, K_l)
        ptr, tokens = self.child_ptr[l], self.child_tokens[l]
        start = ptr[node.clamp(min=0)]                                     # (B,)
        count = torch.where(valid, ptr[node.clamp(min=0) + 1] - start, torch.zeros_like(start))
        row = torch.repeat_interleave(torch.arange(b, device=prefixes.device), count)  # (E,)
        first = torch.cumsum(count, dim=0) - count                         # (B,) row's first slot
        pos = start[row] + torch.arange(len(row), device=prefixes.device) - first[row]
        out = torch.zeros(b, self.sizes[l], dtype=torch.bool, device=prefixes.device)
        out[row, tokens[pos]] = True
        return out

    def item_of(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, L) int64 -> (B,) row of the matching code in `from_codes`' input, -1 if none."""
        if codes.dim() != 2 or codes.shape[1] != self.levels:
            raise ValueError(f"codes must be (B, {self.levels}), got shape {tuple(codes.shape)}")
        key, in_range = self._keys(codes)
        pos = self._find(self.leaf_keys, key, in_range)
        return torch.where(pos >= 0, self.leaf_items[pos.clamp(min=0)], pos)


class DictTrie:
    """Plain reference for `CodeTrie`: nested dicts {token: child}, leaves hold the item row."""

    def __init__(self, root: dict, sizes: list[int]):
        self.root = root
        self.sizes = sizes
        self.levels = len(sizes)

    @classmethod
    def from_codes(cls, codes: torch.Tensor, sizes=None) -> DictTrie:
        sizes = _check_codes(codes, sizes)
        root: dict = {}
        for row, code in enumerate(codes.tolist()):
            node = root
            for token in code[:-1]:
                node = node.setdefault(token, {})
            if code[-1] in node:
                raise ValueError("codes has duplicate rows; item_of needs one item per code")
            node[code[-1]] = row
        return cls(root, sizes)

    def _walk(self, code: list[int]):
        node = self.root
        for token in code:
            if not isinstance(node, dict) or token not in node:
                return None
            node = node[token]
        return node

    def allowed(self, prefixes: torch.Tensor) -> torch.Tensor:
        if prefixes.dim() != 2 or not 0 <= prefixes.shape[1] < self.levels:
            raise ValueError(f"prefixes must be (B, l) with 0 <= l < {self.levels}, "
                             f"got shape {tuple(prefixes.shape)}")
        out = torch.zeros(prefixes.shape[0], self.sizes[prefixes.shape[1]], dtype=torch.bool)
        for i, prefix in enumerate(prefixes.tolist()):
            node = self._walk(prefix)
            for token in (node or {}):
                out[i, token] = True
        return out.to(prefixes.device)

    def item_of(self, codes: torch.Tensor) -> torch.Tensor:
        if codes.dim() != 2 or codes.shape[1] != self.levels:
            raise ValueError(f"codes must be (B, {self.levels}), got shape {tuple(codes.shape)}")
        rows = [self._walk(code) for code in codes.tolist()]
        return torch.tensor([r if isinstance(r, int) else -1 for r in rows], dtype=torch.int64,
                            device=codes.device)
