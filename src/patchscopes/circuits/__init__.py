"""Circuits (Ge, Rudzicz & Zhu 2024): differentiable weight masks, edge attribution patching, circuit
analysis and the knowledge-edit view. See ``docs/circuits.md``."""
