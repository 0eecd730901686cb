"""Probes that need no training: what a memory can hold before a model learns anything.

``capacity_probe`` (growmem/probe/capacity.py) measures recall against the number of key-value
pairs for the base memory, uniform averaging, an oracle that reads the right segment, and the
gated aggregations; ``growmem probe capacity`` runs it from the command line.
"""

from growmem.probe.capacity import (
    Layout,
    capacity_probe,
    draw_keys,
    gated_mix,
    probe_reads,
    recalled,
    series_name,
)

__all__ = [
    "Layout",
    "capacity_probe",
    "draw_keys",
    "gated_mix",
    "probe_reads",
    "recalled",
    "series_name",
]
