"""Health: what the library measures while a model runs, and what it says about it.

    probe.py           per-call health of one attention module (AttentionHealth)
    monitor/           HealthMonitor: samples the probe during training, series, maps
    early_warnings.py  warnings raised from the monitored series
    warning_history.py the running statistics the warnings read (one sample at a time)
    guard.py           a guard against non-finite values
    distributed.py     health reduced across ranks

The pure formulas live in :mod:`robust_attn.metrics`.
"""
