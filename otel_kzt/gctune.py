"""CPython's cyclic garbage collector spaced out for the two long-lived services.

Both keep about a million objects for hours (the enricher's ~10 per series; the agent's flow keys,
counters and point heads at 100,000 flows) and allocate a few per data point or changed flow. With the
default threshold a young collection runs every 700 allocations and every tenth of those grows toward a
full collection, which walks every live object: ~0.06 s for the agent at 100,000 flows, about every other
interval. Spaced out, young collections cost the enricher ~10% less CPU (bench/enricher.py) and the
agent's interval at 100,000 flows ~0.06 s less (bench/agent.py --kernel); cycles are still collected,
later. Process-wide, as a service's start may set it; never lowered.

A burst of new, long-lived objects (the enricher's first interval in a large cluster: 200k series, ~8
objects each) is kept out of the young collections while it lasts (`burst`): each would walk every object
allocated since the last one, find them all alive, and every tenth walk the previous ten's survivors
again. After each step of a burst every tracked object is frozen (gc.freeze moves all generations, the
older ones too, to the permanent one: not walked; still freed when nothing refers to it); when the burst
ends, or BURST_DEFERRED allocations were set aside, it all goes back to the oldest generation
(gc.unfreeze), where any cycle in it is collected as before. So while a burst lasts, at most
BURST_DEFERRED new allocations (and the cycles already among the older objects) wait for the collector.
"""

from __future__ import annotations

import gc
import threading

YOUNG_THRESHOLD = 50_000  # allocations between young collections (CPython's default: 700)
BURST_DEFERRED = 4_000_000  # allocations a burst may set aside before they go back to the collector
_lock = threading.Lock()
_deferred = 0  # allocations set aside by the current burst (0: none)


def space_collections() -> None:
    gen0, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(max(gen0, YOUNG_THRESHOLD), gen1, gen2)


def burst(on: bool) -> None:
    """After one step of a burst of new, long-lived objects (`on`): every tracked object is set aside, the
    step's new ones counted against the bound; after any other step, or past the bound, all goes back."""
    global _deferred
    with _lock:
        if on:
            young = gc.get_count()[0]  # allocated since the last collection (or freeze), less the freed
            if _deferred + young <= BURST_DEFERRED:
                gc.freeze()
                _deferred += max(young, 1)
                return
        if _deferred:
            gc.unfreeze()
            _deferred = 0
