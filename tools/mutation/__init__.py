"""Mutation testing of growmem's user-facing modules: a catalogue of planted bugs and its runner."""
