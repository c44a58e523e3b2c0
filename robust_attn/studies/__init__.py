"""Studies: the deep-stack harness and what the library claims from it.

    stack.py        stacks of attention layers built as users build them, measured per layer
    diagnostics.py  trainability diagrams (signal propagation over depth)
    claims.py       each preset's claim and the setting in which it is measured
    plotting.py     pictures of the above
"""
