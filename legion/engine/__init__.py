"""The model: llama.cpp engines (continuous batching, prefix cache, scoring), chat templates,
grammars for constrained output, the embedding model, prompt framing, the llama.cpp build
backend and the start-up check. Imports only the shared ground (``legion.config`` and friends).

Kept free of imports: ``legion.engine.llama_build`` is the project's build backend and runs in
pip's build environment, where nothing but setuptools is installed.
"""
