"""Issue 16, finding 5: health_probe() entered and left from two threads.

The switch a ``health_probe()`` block sets holds in its own thread only and is restored on
exit, however the blocks of two threads interleave: each thread measures exactly what it
measures alone, and no global state is left behind. The old process-wide switch, saved and
restored by each block, was left on after both blocks had ended (and off inside the second
thread's block after the first thread left its own).
"""

import threading

import torch

from robust_attn import create, health_probe, set_probe_enabled
from robust_attn.health.probe import probe_enabled_everywhere

DIM, HEADS = 16, 2


def _health(module, x):
    module(x)
    return None if module.health is None else module.health.entropy.clone()


def test_two_threads_entering_and_leaving_health_probe_interleaved():
    modules = [create("baseline", DIM, num_heads=HEADS) for _ in range(2)]
    inputs = [torch.randn(2, 6, DIM, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    # one thread alone
    alone = []
    for module, x in zip(modules, inputs, strict=True):
        with health_probe():
            alone.append(_health(module, x))
        module.health = None
    # A enters, B enters, A leaves, B measures, B leaves, A measures outside its block
    a_in, b_in, a_out, b_done = (threading.Event() for _ in range(4))
    seen = {}

    def thread_a():
        with health_probe():
            a_in.set()
            b_in.wait(5)
            seen["a inside"] = _health(modules[0], inputs[0])
        a_out.set()
        b_done.wait(5)
        modules[0].health = None
        seen["a after"] = (probe_enabled_everywhere(), _health(modules[0], inputs[0]))

    def thread_b():
        a_in.wait(5)
        with health_probe():
            b_in.set()
            a_out.wait(5)
            seen["b inside"] = (probe_enabled_everywhere(), _health(modules[1], inputs[1]))
        seen["b after"] = probe_enabled_everywhere()
        b_done.set()

    threads = [threading.Thread(target=thread_a), threading.Thread(target=thread_b)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert not any(thread.is_alive() for thread in threads)
    torch.testing.assert_close(seen["a inside"], alone[0], rtol=0, atol=0)
    assert seen["b inside"][0] is True
    torch.testing.assert_close(seen["b inside"][1], alone[1], rtol=0, atol=0)
    assert seen["b after"] is False
    assert seen["a after"] == (False, None)
    assert probe_enabled_everywhere() is False  # nothing left behind in the main thread


def test_the_default_set_outside_blocks_holds_in_every_thread_and_blocks_nest():
    set_probe_enabled(True)
    seen = []
    thread = threading.Thread(target=lambda: seen.append(probe_enabled_everywhere()))
    thread.start()
    thread.join(5)
    assert seen == [True]
    with health_probe(False):
        assert not probe_enabled_everywhere()
        with health_probe():
            assert probe_enabled_everywhere()
            set_probe_enabled(False)  # inside a block: the block's setting, until it ends
            assert not probe_enabled_everywhere()
        assert not probe_enabled_everywhere()
    assert probe_enabled_everywhere()  # the default, untouched by the blocks
