"""Host-side integer arithmetic for the launchers.

``triton.cdiv`` and ``triton.next_power_of_2`` are ``constexpr_function``s (Triton 3.6 and 3.9):
callable from kernels, but each host call goes through the decorator's argument unwrapping, ~2.7 us
on the 2-core CI machine (best of 5; 0.2-0.3 us for these). An attention forward made five such
calls and its backward eight, each launch host time that a small problem's kernels do not hide.
These plain versions give the same results (tests/test_triton_attention.py checks them).
"""
from __future__ import annotations


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for integers, b > 0."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1), as triton.next_power_of_2 for n >= 1."""
    return 1 << max(0, int(n) - 1).bit_length()
