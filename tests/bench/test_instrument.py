"""The step breakdown's accounting (bench/instrument.py Breakdown), on a fake clock: nested wrapped calls count
once, and bitsandbytes' 4-bit matmul is split into decode and GEMM when it calls F.linear inside."""

import types

import torch

from instrument import FUSED_4BIT, Breakdown, Clock


class FakeClock(Clock):
    def __init__(self):
        super().__init__(torch.device("cpu"))
        self.now = 0.0

    def mark(self):
        return self.now


def _owner(clock, inner_call: bool):
    owner = types.SimpleNamespace()

    def linear(x):
        clock.now += 3.0
        return x

    def matmul_4bit(x):
        clock.now += 2.0  # the decode
        return owner.linear(x) if inner_call else x

    def attention(x):
        clock.now += 0.5
        return x

    owner.linear, owner.matmul_4bit, owner.attention = linear, matmul_4bit, attention
    return owner


def _run(inner_call: bool):
    clock = FakeClock()
    owner = _owner(clock, inner_call)
    inst = Breakdown(clock)
    inst._wrap(owner, "linear", "gemm")
    inst._wrap(owner, "matmul_4bit", FUSED_4BIT)
    inst._wrap(owner, "attention", "attention")
    owner.matmul_4bit(1)  # not active: not recorded
    inst.active = True
    owner.matmul_4bit(1)
    owner.linear(1)
    owner.attention(1)
    return inst


def test_nested_calls_count_once_and_the_decode_is_split_off():
    inst = _run(inner_call=True)
    assert inst.seconds() == {"dequant": 2.0, "gemm": 6.0, "attention": 0.5}
    assert inst.counts() == {"dequant": 1, "gemm": 2, "attention": 1}


def test_a_fused_4bit_matmul_counts_as_gemm():
    inst = _run(inner_call=False)
    assert inst.seconds() == {"dequant": 0.0, "gemm": 5.0, "attention": 0.5}
    assert inst.counts() == {"dequant": 0, "gemm": 2, "attention": 1}
