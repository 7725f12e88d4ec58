"""Built-in backbones. Each module registers itself through the ``suder`` entry-point group."""
