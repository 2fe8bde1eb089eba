"""Checks callable from Python: the endpoint probe (and doctor's platform checks)."""
