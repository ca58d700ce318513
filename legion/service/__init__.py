"""The service: the task pipeline, request/response models, HTTP plumbing, the OpenAI routes
beyond chat, security, rate limits, audit, the injection guard and health. Imports the shared
ground, ``legion.engine``, ``legion.state`` and ``legion.arbitration``.
"""
