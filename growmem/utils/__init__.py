"""Small helpers shared across growmem (no model or op logic)."""
