"""The ``legion`` command and its benchmarks: the layer above ``actors`` and ``serve_app``.

It starts Ray and Serve, talks HTTP to a running Legion and drives the actors directly; the
Ray-free core in ``legion/`` never imports it.
"""
