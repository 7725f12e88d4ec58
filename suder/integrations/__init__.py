"""Adapters that let other tools drive a suder backbone. Nothing in suder imports this package; each module is
imported by the tool it serves (``lmms_eval``: by lmms-eval, through its ``lmms_eval.models`` entry point)."""
