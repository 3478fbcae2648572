"""Host-side integer arithmetic for the launchers.

``triton.cdiv`` and ``triton.next_power_of_2`` are ``constexpr_function``s (Triton 3.6 and 3.9):
callable from kernels, but each host call goes through the decorator's argument unwrapping, ~10 us
on the 2-core CI machine. A launch computed four to eight of them (head dims, autotuning keys,
grids), 40-80 us of host time per attention call, as much as the whole call of a small problem.
These plain versions give the same results.
"""
from __future__ import annotations


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for integers, b > 0."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1), as triton.next_power_of_2 for n >= 1."""
    return 1 << max(0, int(n) - 1).bit_length()
