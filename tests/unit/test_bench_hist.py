"""The bench's latency histogram: buckets, percentiles, merging."""

from __future__ import annotations

import random

import pytest
from chatd_bench.hist import SUB_BITS, Histogram, bucket_bounds, bucket_of


def test_small_values_are_exact() -> None:
    for v in range(0, 2 ** (SUB_BITS + 1)):
        assert bucket_bounds(bucket_of(v)) == (v, v)


@pytest.mark.parametrize("v", [64, 65, 127, 128, 1000, 123_456, 10**9, 2**40 + 12345])
def test_value_lies_in_its_bucket_within_relative_error(v: int) -> None:
    low, high = bucket_bounds(bucket_of(v))
    assert low <= v <= high
    assert (high - low) / low <= 1 / 2**SUB_BITS


def test_buckets_are_contiguous_and_increasing() -> None:
    prev_high = -1
    for b in range(0, 64 + 32 * 20):
        low, high = bucket_bounds(b)
        assert low == prev_high + 1
        assert bucket_of(low) == b and bucket_of(high) == b
        prev_high = high


def test_percentiles_of_a_uniform_range() -> None:
    h = Histogram()
    for v in range(1, 10_001):
        h.record(v * 1000)
    assert h.total == 10_000
    assert h.min == 1000 and h.max == 10_000_000
    for q, exact in ((50, 5_000_000), (99, 9_900_000), (100, 10_000_000)):
        got = h.percentile(q)
        assert exact <= got <= exact * (1 + 1 / 2**SUB_BITS)
    assert h.percentile(0) == h.percentile(0.0001)


def test_empty_and_bad_quantile() -> None:
    h = Histogram()
    assert h.percentile(99) == 0 and h.mean == 0.0
    h.record(5)
    with pytest.raises(ValueError):
        h.percentile(101)


def test_negative_values_count_as_zero() -> None:
    h = Histogram()
    h.record(-3)
    assert h.percentile(50) == 0


def test_merge_equals_recording_everything_in_one() -> None:
    rng = random.Random(7)
    values = [int(rng.lognormvariate(13, 1.5)) for _ in range(5000)]
    one, a, b = Histogram(), Histogram(), Histogram()
    for i, v in enumerate(values):
        one.record(v)
        (a if i % 3 else b).record(v)
    merged = Histogram().merge(a).merge(b)
    assert merged.counts == one.counts
    assert (merged.total, merged.sum, merged.min, merged.max) == (
        one.total, one.sum, one.min, one.max)
    for q in (50, 90, 99, 99.9):
        assert merged.percentile(q) == one.percentile(q)


def test_round_trip_through_a_dict_with_string_keys() -> None:
    h = Histogram()
    for v in (1, 100, 10_000, 1_000_000):
        h.record(v)
    data = h.to_dict()
    data["counts"] = {str(k): v for k, v in data["counts"].items()}  # as JSON would
    back = Histogram.from_dict(data)
    assert back.counts == h.counts and back.percentile(75) == h.percentile(75)
    assert back.summary_ms()["n"] == 4
