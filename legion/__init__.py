"""Legion: a multi-agent LLM service on Ray, with llama.cpp agents and a game-theoretic Arbiter."""

__version__ = "0.1.0"
