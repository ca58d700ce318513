"""State that outlives a request: the result cache, conversation history, chunking and ingest,
and the vector stores. Imports the shared ground and ``legion.engine`` (the embedding model).
"""
