"""Machine-dependent decisions: the render plan (precision, attention, compile)."""
