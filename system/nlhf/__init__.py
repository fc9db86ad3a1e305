"""nlhf: Nash learning from human feedback with Nash Mirror Prox, on Ray."""

__version__ = "0.1.0"
