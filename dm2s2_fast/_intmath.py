"""Integer helpers for launch configs and buckets, in plain Python.

Host code must not call ``triton.cdiv`` / ``triton.next_power_of_2``: in Triton 3.6 they are
constexpr functions whose calls cost ~2 µs each (measured on this project's CPU machine), and a
launcher calls several per launch.
"""


def cdiv(a: int, b: int) -> int:
    """⌈a / b⌉ for b > 0 (as ``triton.cdiv``)."""
    return -(-a // b)


def next_pow2(x: int) -> int:
    """The least power of two >= x; 0 for x <= 0 (as ``triton.next_power_of_2`` for x >= 0)."""
    return 1 << (x - 1).bit_length() if x > 0 else 0
