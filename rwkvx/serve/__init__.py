"""An OpenAI-compatible HTTP server (``python -m rwkvx.serve``); needs ``pip install ".[server]"``.

app.py (HTTP routes and OpenAI shapes), protocol.py (request checks, response shapes),
engine.py (the scheduler: continuous batching on forward_batch), cache.py (the state LRU),
metrics.py (Prometheus). Nothing here is imported by ``import rwkvx``.
"""
