"""Arbitration: the Arbiter and its session, the strategies, answer equivalence, trust weights,
and how a fitted profile's weights are applied at serve time. Imports the shared ground and
``legion.engine``; never ``legion.evaluation``.
"""
