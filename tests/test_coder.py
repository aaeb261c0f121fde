"""Token range coder: constriction codes exactly our integer tables, round trips, size against
the cross-entropy, uniform mode, the quantisation rule (exactness, determinism, robustness to
one-ulp differences) and bad input."""

from __future__ import annotations

import time

import constriction
import numpy as np
import pytest

from percov2_jax.entropy.coder import (
    CodingError,
    TokenDecoder,
    TokenEncoder,
    cross_entropy_bits,
    decode_tokens,
    decode_uniform,
    encode_tokens,
    encode_uniform,
    payload_bits,
    quantize_probabilities,
    uniform_bits,
)


def softmax_rows(rng, n, vocab, scales=(0.3, 1.0, 3.0, 10.0, 30.0)):
    """float32 [n, V] rows from flat to very peaked (logit scale drawn per row)."""
    scale = rng.choice(scales, size=(n, 1))
    logits = (rng.standard_normal((n, vocab)) * scale).astype(np.float32)
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (p / p.sum(axis=1, keepdims=True)).astype(np.float32)


def sample(rng, probs):
    cum = np.cumsum(probs.astype(np.float64), axis=1)
    u = rng.random((probs.shape[0], 1)) * cum[:, -1:]
    return np.minimum((cum < u).sum(axis=1), probs.shape[1] - 1)


def special_rows(vocab):
    """Exact zeros, one-hot, extremely peaked and tiny-but-nonzero rows."""
    one_hot = np.zeros(vocab, np.float32)
    one_hot[vocab // 3] = 1.0
    peaked = np.full(vocab, 1e-12, np.float32)
    peaked[-1] = 1.0 - 1e-6
    zeros_half = np.zeros(vocab, np.float32)
    zeros_half[::2] = 2.0 / vocab
    tiny = np.full(vocab, 1e-30, np.float32)  # no mass on the grid: uniform table
    return np.stack([one_hot, peaked, zeros_half, tiny])


# ---------------------------------------------------------------------------------------------
# constriction uses exactly our table


@pytest.mark.parametrize("precision", [24, 16])
def test_constriction_codes_exactly_our_integer_table(precision):
    """After one symbol the encoder state is exactly [scale*C_s, scale*C_{s+1}) with our table,
    and the decoder maps both ends of that interval back to s (scale = (2**64 - 1) >> 24)."""
    rng = np.random.default_rng(0)
    scale = ((1 << 64) - 1) >> 24
    up = 1 << (24 - precision)
    for vocab in (2, 3, 257, 8192):
        f = quantize_probabilities(softmax_rows(rng, 1, vocab, scales=(3.0,)), precision)[0]
        cum = np.concatenate([[0], np.cumsum(f.astype(np.int64))]) * up
        model = constriction.stream.model.Categorical(perfect=False)
        for s in {0, 1, vocab - 1, int(rng.integers(vocab)), int(np.argmax(f))}:
            encoder = TokenEncoder(precision)
            encoder.encode_step(f[None], [s])
            _, (lower, range_) = encoder._coder.pos()
            assert (lower, range_) == (scale * int(cum[s]), scale * int(cum[s + 1] - cum[s]))
            pmf = (f[None].astype(np.int64) * up - 1).astype(np.float64)
            for point in (scale * int(cum[s]), scale * int(cum[s + 1]) - 1):
                words = np.array([point >> 32, point & 0xFFFFFFFF], np.uint32)
                decoded = constriction.stream.queue.RangeDecoder(words).decode(model, pmf)
                assert decoded.tolist() == [s]


# ---------------------------------------------------------------------------------------------
# Round trips and size


@pytest.mark.parametrize("vocab", [2, 256, 1024, 8192])
def test_round_trip_random_tables(vocab):
    rng = np.random.default_rng(vocab)
    for trial in range(3):
        steps = []
        for n in rng.integers(0, 24, size=4).tolist() + [4]:
            probs = softmax_rows(rng, n, vocab)
            if n == 4:
                probs = special_rows(vocab)
            symbols = sample(rng, probs)
            if trial == 2 and n:  # symbols the model thinks (nearly) impossible
                symbols[0] = np.argmin(probs[0])
            steps.append((quantize_probabilities(probs), symbols))
        data = encode_tokens(steps)
        decoded = decode_tokens(data, [f for f, _ in steps])
        for (_, symbols), got in zip(steps, decoded):
            np.testing.assert_array_equal(got, symbols)
            assert got.dtype == np.int32


def test_round_trip_incremental_decoder_and_precision_16():
    """The decoder rebuilds each step's table from the symbols it has decoded so far."""
    rng = np.random.default_rng(1)
    vocab, steps = 64, 6

    def model(revealed):  # a deterministic stand-in for the prior
        counts = np.bincount(np.concatenate(revealed), minlength=vocab) if revealed else np.zeros(vocab)
        p = (counts + 0.5) / (counts + 0.5).sum()
        return np.tile(p, (7, 1)).astype(np.float32)

    for precision in (16, 24):
        encoder, revealed = TokenEncoder(precision), []
        for _ in range(steps):
            symbols = rng.integers(0, 8, size=7)  # a skewed source
            encoder.encode_step(quantize_probabilities(model(revealed), precision), symbols)
            revealed.append(symbols)
        data = encoder.finish()
        decoder, decoded = TokenDecoder(data, precision), []
        for _ in range(steps):
            decoded.append(decoder.decode_step(quantize_probabilities(model(decoded), precision)))
        decoder.finish()
        np.testing.assert_array_equal(np.concatenate(decoded), np.concatenate(revealed))
        assert decoder.num_tokens == encoder.num_tokens == 7 * steps


def test_empty_and_trivial_streams():
    assert encode_tokens([]) == b""
    f = quantize_probabilities(np.array([[1.0, 0.0, 0.0]], np.float32))
    assert decode_tokens(b"", [f[:0]])[0].shape == (0,)
    data = encode_tokens([(f, [0])] * 3)  # the most likely symbol from the start: one point
    assert payload_bits(data) <= 8
    assert [s.tolist() for s in decode_tokens(data, [f] * 3)] == [[0]] * 3


def test_size_matches_cross_entropy():
    """~4,000 tokens: within 0.5% + 8 bytes of the quantised tables' cross-entropy, and of the
    float model's (the tables cost < 0.1% here)."""
    rng = np.random.default_rng(2)
    for vocab, n_steps in ((256, 16), (1024, 16)):
        probs = [softmax_rows(rng, 256, vocab) for _ in range(n_steps)]
        steps = [(quantize_probabilities(p), sample(rng, p)) for p in probs]
        data = encode_tokens(steps)
        bits = payload_bits(data)
        ce_quantized = sum(cross_entropy_bits(f, s) for f, s in steps)
        ce_float = sum(cross_entropy_bits(p, s) for p, (_, s) in zip(probs, steps))
        assert ce_quantized - 64 <= bits <= 1.005 * ce_quantized + 64, (bits, ce_quantized)
        assert abs(bits - ce_float) <= 0.005 * ce_float + 64, (bits, ce_float)
        assert 8 * len(data) - bits < 8
        np.testing.assert_array_equal(
            np.concatenate(decode_tokens(data, [f for f, _ in steps])), np.concatenate([s for _, s in steps])
        )


def test_short_messages_cost_at_most_a_few_bits_over_cross_entropy():
    """Bit-exact termination: 8x8 tokens cost ceil(information) to ceil(information) + 1 bits."""
    rng = np.random.default_rng(3)
    excess = []
    for _ in range(40):
        p = softmax_rows(rng, 64, 1024)
        f, s = quantize_probabilities(p), sample(rng, p)
        data = encode_tokens([(f, s)])
        excess.append(payload_bits(data) - cross_entropy_bits(f, s))
        assert decode_tokens(data, [f])[0].tolist() == s.tolist()
    assert min(excess) >= -0.01 and max(excess) <= 2.1 and np.mean(excess) <= 1.2, excess


def test_payload_bits_container_round_trip():
    """Storing only payload_bits bits and padding with zeros decodes the same tokens."""
    rng = np.random.default_rng(4)
    for _ in range(20):
        p = softmax_rows(rng, 30, 256)
        f, s = quantize_probabilities(p), sample(rng, p)
        data = encode_tokens([(f, s)])
        bits = payload_bits(data)
        value = int.from_bytes(data, "big") >> (8 * len(data) - bits)
        repacked = (value << (-bits % 8)).to_bytes(-(-bits // 8), "big")
        assert repacked == data
        assert decode_tokens(data + b"\0\0\0\0\0", [f])[0].tolist() == s.tolist()
    assert payload_bits(b"") == 0 and payload_bits(b"\x00\x00") == 0
    assert payload_bits(b"\x80") == 1 and payload_bits(b"\x01\x00") == 8 and payload_bits(b"\x00\x06") == 15


# ---------------------------------------------------------------------------------------------
# Uniform mode


def test_uniform_mode_exact_bits_and_round_trip():
    rng = np.random.default_rng(5)
    assert uniform_bits(64, 256) == 512 and len(encode_uniform(np.zeros(64, np.int64), 256)) == 64
    for vocab in (2, 256, 1024, 8192, 16384):
        for n in (1, 64, 96, 1024):
            s = rng.integers(0, vocab, size=n)
            data = encode_uniform(s, vocab)
            assert uniform_bits(n, vocab) == n * int(np.log2(vocab))
            assert len(data) == -(-uniform_bits(n, vocab) // 8)
            np.testing.assert_array_equal(decode_uniform(data, n, vocab), s)
    for vocab in (3, 1000, 6000):  # not powers of two: exact mixed-radix packing
        for n in (1, 7, 64, 500):
            s = rng.integers(0, vocab, size=n)
            assert uniform_bits(n, vocab) == int(np.ceil(n * np.log2(vocab) - 1e-9))
            np.testing.assert_array_equal(decode_uniform(encode_uniform(s, vocab), n, vocab), s)
    assert uniform_bits(0, 256) == 0 and encode_uniform(np.zeros(0, np.int32), 256) == b""
    assert decode_uniform(b"", 0, 256).shape == (0,)


def test_uniform_mode_errors():
    with pytest.raises(CodingError):
        encode_uniform(np.array([256]), 256)
    with pytest.raises(CodingError):
        encode_uniform(np.array([-1]), 256)
    with pytest.raises(CodingError):
        encode_uniform(np.zeros((2, 2), np.int64), 256)
    with pytest.raises(CodingError):
        uniform_bits(3, 1)
    with pytest.raises(CodingError):
        decode_uniform(b"\0" * 63, 64, 256)  # truncated
    with pytest.raises(CodingError):
        decode_uniform(b"\x01", 1, 128)  # padding bit set
    with pytest.raises(CodingError):
        decode_uniform(b"\xff", 1, 3)  # value >= V**n


# ---------------------------------------------------------------------------------------------
# Quantisation


def test_quantize_properties():
    rng = np.random.default_rng(6)
    for vocab in (2, 256, 8192):
        probs = np.concatenate([softmax_rows(rng, 50, vocab), special_rows(vocab)])
        for precision in (14, 16, 24):
            f = quantize_probabilities(probs, precision)
            assert f.dtype == np.int32 and f.shape == probs.shape
            assert (f >= 1).all() and (f.sum(axis=1) == 1 << precision).all()
            np.testing.assert_array_equal(f, quantize_probabilities(probs, precision))
            rows_alone = np.concatenate([quantize_probabilities(r[None], precision) for r in probs[:5]])
            np.testing.assert_array_equal(rows_alone, f[:5])  # no dependence on batching
        f = quantize_probabilities(probs)
        np.testing.assert_array_equal(quantize_probabilities(probs.astype(np.float64)), f)
        assert (f[-1] == f[-1, 0]).sum() >= vocab - 1  # no mass on the grid: uniform
        one_hot = f[-4]
        assert one_hot[vocab // 3] == (1 << 24) - (vocab - 1)  # zeros get exactly one count


def test_quantize_tie_break_is_by_symbol_index():
    """Equal probabilities: the extra counts of the largest-remainder step go to the lowest
    indices."""
    f = quantize_probabilities(np.full((1, 3), 1 / 3, np.float32), precision=4)[0]
    assert f.tolist() == [6, 5, 5]  # 13 free counts: 4 each + 1 extra
    p = np.full((1, 6), 1 / 6, np.float32)
    f = quantize_probabilities(p, precision=5)[0]  # 26 free counts over 6: 4 each + 2 extra
    assert f.tolist() == [6, 6, 5, 5, 5, 5]


def _perturb_all(rng, p):
    up = rng.random(p.shape) < 0.5
    return np.where(up, np.nextafter(p, np.float32(1)), np.nextafter(p, np.float32(0))).astype(np.float32)


def _perturb_one(rng, p):
    q, rows = p.copy(), np.arange(len(p))
    cols = rng.integers(0, p.shape[1], size=len(p))
    target = np.where(rng.random(len(p)) < 0.5, np.float32(1), np.float32(0)).astype(np.float32)
    q[rows, cols] = np.nextafter(p[rows, cols], target)
    return q


@pytest.mark.parametrize("vocab,n", [(256, 4000), (8192, 1000)])
def test_quantize_robust_to_one_ulp(vocab, n):
    """>= 99% of rows keep their table under a 1-ulp change. Measured on 5,000-20,000 rows: a
    change of every entry alters 0.02% (V=256), 0.06% (V=1024), 0.42% (V=8192) of tables; a
    change of one entry none in 35,000."""
    rng = np.random.default_rng(7)
    p = softmax_rows(rng, n, vocab)
    f = quantize_probabilities(p)
    changed_all = (quantize_probabilities(_perturb_all(rng, p)) != f).any(axis=1).mean()
    changed_one = (quantize_probabilities(_perturb_one(rng, p)) != f).any(axis=1).mean()
    print(
        f"V={vocab}: tables changed by a 1-ulp change of every entry {100 * changed_all:.2f}% "
        f"of rows, of one entry {100 * changed_one:.3f}%"
    )
    assert changed_all <= 0.01 and changed_one <= 0.01


def test_quantized_tables_cost_little_against_the_float_model():
    rng = np.random.default_rng(8)
    for vocab, n in ((256, 2000), (8192, 300)):
        p = softmax_rows(rng, n, vocab)
        pd = p.astype(np.float64) / p.astype(np.float64).sum(axis=1, keepdims=True)
        f = quantize_probabilities(p)
        with np.errstate(divide="ignore", invalid="ignore"):
            plogp = np.where(pd > 0, pd * np.log2(pd), 0.0)
        kl = (plogp - pd * np.log2(f / 2.0**24)).sum(axis=1).mean()
        entropy = -plogp.sum(axis=1).mean()
        assert 0 <= kl <= 0.002 and kl <= 0.001 * entropy, (vocab, kl, entropy)


# ---------------------------------------------------------------------------------------------
# Mismatched tables, damaged data and bad input


def test_wrong_tables_fail_or_change_symbols():
    """Decoding with another model's tables raises (nearly always) or yields other tokens; a
    one-count change in the true symbol's entry raises, yields other tokens, or, when the change
    does not alter the bytes, the right tokens. Never a crash or a hang."""
    rng = np.random.default_rng(9)
    outcomes = {
        "other model": {"error": 0, "different": 0, "same": 0},
        "one count": {"error": 0, "different": 0, "same": 0},
    }
    for trial in range(120):
        p = softmax_rows(rng, 32, 256)
        f, s = quantize_probabilities(p), sample(rng, p)
        data = encode_tokens([(f, s)])
        if trial % 2:
            kind, wrong = "other model", quantize_probabilities(softmax_rows(rng, 32, 256))
        else:
            kind, wrong, row = "one count", f.copy(), int(rng.integers(32))
            other = (int(s[row]) + 1 + int(rng.integers(255))) % 256
            donor, taker = (s[row], other) if wrong[row, s[row]] > 1 else (other, s[row])
            wrong[row, donor] -= 1
            wrong[row, taker] += 1
        start = time.perf_counter()
        try:
            got = decode_tokens(data, [wrong])[0]
        except CodingError:
            outcomes[kind]["error"] += 1
        else:
            same = got.tolist() == s.tolist()
            outcomes[kind]["same" if same else "different"] += 1
            assert encode_tokens([(wrong, got)]) == data
        assert time.perf_counter() - start < 1.0
    print(outcomes)
    assert outcomes["other model"]["error"] >= 0.9 * 60 and outcomes["other model"]["same"] == 0
    assert outcomes["one count"]["error"] >= 0.4 * 60, outcomes


def test_truncated_and_mutated_data_raise_coding_error():
    rng = np.random.default_rng(10)
    p = [softmax_rows(rng, 40, 512) for _ in range(3)]
    steps = [(quantize_probabilities(x), sample(rng, x)) for x in p]
    tables = [f for f, _ in steps]
    data = encode_tokens(steps)
    for cut in range(1, len(data)):
        with pytest.raises(CodingError):
            decode_tokens(data[:-cut], tables)
    detected = 0
    for trial in range(100):  # short single-step payloads, cut by 1-3 bytes
        x = softmax_rows(rng, 32, 256)
        f, s = quantize_probabilities(x), sample(rng, x)
        short = encode_tokens([(f, s)])[: -1 - trial % 3]
        try:
            assert decode_tokens(short, [f])[0].tolist() != s.tolist()
        except CodingError:
            detected += 1
    assert detected >= 95
    for _ in range(300):  # bounded fuzz: only CodingError, or a stream that is valid for what it decodes to
        mutated = bytearray(data)
        for i in rng.integers(0, len(data), size=int(rng.integers(1, 4))):
            mutated[i] ^= int(rng.integers(1, 256))
        mutated = bytes(mutated[: int(rng.integers(0, len(data) + 3))] if rng.random() < 0.3 else mutated)
        try:
            decoded = decode_tokens(mutated, tables)
        except CodingError:
            continue
        assert encode_tokens(zip(tables, decoded)) == mutated.rstrip(b"\0")


def test_garbage_raises_and_a_failed_decoder_stays_failed():
    f = quantize_probabilities(softmax_rows(np.random.default_rng(11), 8, 16))
    decoder = TokenDecoder(b"\xff" * 64)  # a point above every interval: constriction refuses
    with pytest.raises(CodingError):
        decoder.decode_step(f)
    with pytest.raises(CodingError):
        decoder.decode_step(f)
    with pytest.raises(CodingError):
        decoder.finish()
    decoder = TokenDecoder(bytes(range(7, 250)))  # decodes to something, then fails the check
    for _ in range(100):
        decoder.decode_step(f)
    with pytest.raises(CodingError):
        decoder.finish()


@pytest.mark.parametrize(
    "bad",
    [
        np.ones((4,), np.float32) / 4,  # not [n, V]
        np.ones((2, 1), np.float32),  # V < 2
        np.array([[0.5, -0.1, 0.6]], np.float32),
        np.array([[0.5, np.nan, 0.5]], np.float32),
        np.array([[0.5, np.inf, 0.5]], np.float32),
        np.array([[1.5, 0.0]], np.float32),
        np.array([[0.0, 0.0]], np.float32),  # no mass
        np.array([[1, 0]], np.int64),  # integer "probabilities"
        np.array([["0.5", "0.5"]]),
    ],
)
def test_quantize_rejects_bad_probabilities(bad):
    with pytest.raises(CodingError):
        quantize_probabilities(bad)


def test_quantize_rejects_bad_precision_and_alphabet():
    p = np.full((1, 8), 1 / 8, np.float32)
    for precision in (0, 25, 2.0):
        with pytest.raises(CodingError):
            quantize_probabilities(p, precision)
    with pytest.raises(CodingError):
        quantize_probabilities(np.full((1, 64), 1 / 64, np.float32), precision=6)  # V > 2**(P-1)
    with pytest.raises(CodingError):
        quantize_probabilities(p, mantissa_bits=24)


def test_coder_rejects_bad_tables_and_symbols():
    f = quantize_probabilities(np.full((2, 4), 0.25, np.float32))
    encoder = TokenEncoder()
    bad_calls = [
        (f, [0, 4]),
        (f, [-1, 0]),
        (f, [0]),
        (f, [[0, 1]]),
        (f, [0.0, 1.0]),  # symbols
        (f[0], [0]),
        (f.astype(np.float64), [0, 1]),  # shapes and dtypes
        (f + np.array([[-f[0, 0], f[0, 0], 0, 0]]), [1, 1]),  # a zero count
        (f + np.array([[1, 0, 0, 0]]), [0, 1]),  # wrong sum
        (quantize_probabilities(np.full((2, 4), 0.25, np.float32), 16), [0, 1]),  # other precision
    ]
    for frequencies, symbols in bad_calls:
        with pytest.raises(CodingError):
            encoder.encode_step(frequencies, np.asarray(symbols))
    assert encoder.num_tokens == 0 and encoder.finish() == b""
    with pytest.raises(CodingError):
        TokenEncoder(precision=25)
    with pytest.raises(CodingError):
        TokenDecoder("not bytes")
    with pytest.raises(CodingError):
        TokenDecoder(b"").decode_step(f.astype(np.float32))


def test_cross_entropy_bits():
    p = np.array([[0.5, 0.25, 0.25], [0.125, 0.875, 0.0]], np.float32)
    assert cross_entropy_bits(p, [0, 0]) == pytest.approx(1 + 3)
    assert cross_entropy_bits(2 * p, np.array([1, 1])) == pytest.approx(2 - np.log2(0.875))
    assert cross_entropy_bits(p, [0, 2]) == np.inf
    assert cross_entropy_bits(np.array([[1 << 23, 1 << 23]]), [1]) == pytest.approx(1.0)
    with pytest.raises(CodingError):
        cross_entropy_bits(p, [0])
    with pytest.raises(CodingError):
        cross_entropy_bits(p, [0, 3])
