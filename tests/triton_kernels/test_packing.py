"""Bit layout and exact round trips of triton_kernels.packing."""

import pytest
import torch

from triton_kernels.packing import (
    num_words, pack_binary, pack_bits, pack_ternary, unpack_binary, unpack_bits, unpack_ternary,
)


def _rand_pm1(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, shape, generator=g) * 2 - 1


def _rand_ternary(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-1, 2, shape, generator=g)


@pytest.mark.parametrize("k,words", [(1, 1), (31, 1), (32, 1), (33, 2), (64, 2), (65, 3), (1000, 32)])
def test_num_words(k, words):
    assert num_words(k) == words


def test_num_words_rejects_nonpositive():
    with pytest.raises(ValueError, match="K must be >= 1"):
        num_words(0)


def test_layout_lsb_first_and_padding_zero():
    # k = 0 -> +1 (bit 0 set); k = 31 -> +1 (sign bit of word 0); k = 32 -> +1 (bit 0 of word 1).
    v = -torch.ones(35, dtype=torch.int64)
    v[0] = v[31] = v[32] = 1
    w = pack_binary(v)
    assert w.dtype == torch.int32 and w.shape == (2,)
    assert int(w[0]) == 1 - 2**31  # bits 0 and 31 -> 0x80000001 as two's complement int32
    assert int(w[1]) == 1  # bit 0 only; padded bits 3..31 are 0
    assert unpack_bits(w, 35).tolist() == [int(x) for x in (v > 0)]


def test_pack_bits_matches_python_ints():
    g = torch.Generator().manual_seed(3)
    bits = torch.randint(0, 2, (5, 70), generator=g)
    words = pack_bits(bits)
    for r in range(5):
        for i in range(3):
            chunk = bits[r, 32 * i: 32 * i + 32].tolist()
            expected = sum(b << j for j, b in enumerate(chunk))
            expected -= 2**32 if expected >= 2**31 else 0
            assert int(words[r, i]) == expected


@pytest.mark.parametrize("shape", [(1,), (32,), (3, 33), (2, 5, 95), (4, 128), (1, 1, 1)])
def test_binary_round_trip(shape):
    v = _rand_pm1(*shape, seed=len(shape))
    w = pack_binary(v)
    assert w.shape == (*shape[:-1], num_words(shape[-1]))
    assert torch.equal(unpack_binary(w, shape[-1], torch.int64), v)


@pytest.mark.parametrize("shape", [(7,), (3, 33), (2, 4, 64), (5, 97)])
def test_ternary_round_trip_and_planes(shape):
    v = _rand_ternary(*shape, seed=7)
    w = pack_ternary(v)
    assert w.shape == (*shape[:-1], 2, num_words(shape[-1]))
    assert torch.equal(unpack_ternary(w, shape[-1], torch.int64), v)
    assert torch.equal(unpack_bits(w[..., 0, :], shape[-1]).bool(), v > 0)
    assert torch.equal(unpack_bits(w[..., 1, :], shape[-1]).bool(), v != 0)


def test_popcount_identity_with_padding():
    # dot = K - 2 popcount(a xor b) with the true K, padded bits agreeing.
    for k in (5, 32, 33, 77):
        a, b = _rand_pm1(k, seed=k), _rand_pm1(k, seed=k + 100)
        xor = pack_binary(a) ^ pack_binary(b)
        pop = sum(bin(int(x) & 0xFFFFFFFF).count("1") for x in xor)
        assert k - 2 * pop == int((a * b).sum())


def test_pack_rejects_bad_values_and_types():
    with pytest.raises(ValueError, match="binary tensor must only contain values"):
        pack_binary(torch.tensor([1, 0, -1]))
    with pytest.raises(ValueError, match="ternary tensor must only contain values"):
        pack_ternary(torch.tensor([1.0, 0.5]))
    with pytest.raises(TypeError, match="real numeric"):
        pack_binary(torch.tensor([True, False]))
    with pytest.raises(ValueError, match="at least one dimension"):
        pack_binary(torch.tensor(1))


def test_unpack_rejects_bad_words():
    w = pack_binary(_rand_pm1(3, 40))
    with pytest.raises(TypeError, match="int32"):
        unpack_binary(w.to(torch.int64), 40)
    with pytest.raises(ValueError, match="needs 1 words, got 2"):
        unpack_binary(w, 20)
    with pytest.raises(ValueError, match=r"\[..., 2, KW\]"):
        unpack_ternary(w, 40)
