"""A mergeable log-bucket latency histogram (HDR-like), with no I/O.

Values are integers (nanoseconds in the bench). Values below ``2**(SUB_BITS+1)``
have a bucket each; above, every power of two is split into ``2**SUB_BITS``
buckets, so a reported percentile is at most ``1 / 2**SUB_BITS`` (about 3 %)
above the true value. The counts are a sparse ``{bucket: count}`` dict, so a
histogram crosses a process boundary as a small dict and two of them merge by
adding counts.
"""

from __future__ import annotations

from typing import Any

SUB_BITS = 5
_SUB = 1 << SUB_BITS
_LINEAR = 1 << (SUB_BITS + 1)  # values below this are exact


def bucket_of(value: int) -> int:
    """The bucket index of ``value`` (negative values count as 0)."""
    if value < _LINEAR:
        return value if value > 0 else 0
    shift = value.bit_length() - (SUB_BITS + 1)
    return _LINEAR + (shift - 1) * _SUB + ((value >> shift) - _SUB)


def bucket_bounds(index: int) -> tuple[int, int]:
    """The smallest and largest value that land in bucket ``index``."""
    if index < _LINEAR:
        return index, index
    shift = (index - _LINEAR) // _SUB + 1
    top = (index - _LINEAR) % _SUB + _SUB
    low = top << shift
    return low, low + (1 << shift) - 1


class Histogram:
    """Counts of values in log buckets, plus exact count, sum, min and max."""

    __slots__ = ("counts", "total", "sum", "min", "max")

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.total = 0
        self.sum = 0
        self.min = 0
        self.max = 0

    def record(self, value: int) -> None:
        b = bucket_of(value)
        counts = self.counts
        counts[b] = counts.get(b, 0) + 1
        if self.total == 0 or value < self.min:
            self.min = value
        if value > self.max:
            self.max = value
        self.total += 1
        self.sum += value

    def merge(self, other: Histogram) -> Histogram:
        """Add ``other``'s counts to this one; returns self."""
        if other.total == 0:
            return self
        counts = self.counts
        for b, n in other.counts.items():
            counts[b] = counts.get(b, 0) + n
        self.min = other.min if self.total == 0 else min(self.min, other.min)
        self.max = max(self.max, other.max)
        self.total += other.total
        self.sum += other.sum
        return self

    def percentile(self, q: float) -> int:
        """The value at quantile ``q`` (0..100): the upper bound of the bucket
        holding the ceil(q% * total)-th smallest value, capped by the max.
        0 when empty."""
        if self.total == 0:
            return 0
        if not 0 <= q <= 100:
            raise ValueError(f"percentile {q} is outside 0..100")
        rank = max(1, -(-self.total * q // 100))  # ceil, at least the first value
        seen = 0
        for b in sorted(self.counts):
            seen += self.counts[b]
            if seen >= rank:
                return min(bucket_bounds(b)[1], self.max)
        return self.max

    @property
    def mean(self) -> float:
        return self.sum / self.total if self.total else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"counts": self.counts, "total": self.total, "sum": self.sum,
                "min": self.min, "max": self.max}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Histogram:
        h = cls()
        h.counts = {int(k): int(v) for k, v in data["counts"].items()}
        h.total, h.sum = int(data["total"]), int(data["sum"])
        h.min, h.max = int(data["min"]), int(data["max"])
        return h

    def summary_ms(self) -> dict[str, float]:
        """p50/p90/p99/p99.9/max and mean in milliseconds."""
        ms = 1e-6
        return {"p50": self.percentile(50) * ms, "p90": self.percentile(90) * ms,
                "p99": self.percentile(99) * ms, "p999": self.percentile(99.9) * ms,
                "max": self.max * ms, "mean": self.mean * ms, "n": self.total}
