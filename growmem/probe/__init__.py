"""Probes that need no training: what a memory can hold before a model learns anything.

``capacity_probe`` (growmem/probe/capacity.py) measures recall against the number of key-value
pairs for the base memory, uniform averaging, an oracle that reads the right segment, and the
gated aggregations (the library's default gates, and dot-product scales); ``growmem probe
capacity`` runs it from the command line.
"""

from growmem.probe.capacity import (
    Gates,
    Layout,
    capacity_probe,
    draw_keys,
    gate_setting,
    gated_mix,
    probe_reads,
    recalled,
    series_name,
)

__all__ = [
    "Gates",
    "Layout",
    "capacity_probe",
    "draw_keys",
    "gate_setting",
    "gated_mix",
    "probe_reads",
    "recalled",
    "series_name",
]
