"""Development machinery, never deployed: a local emulation of the Azure Functions host around the real
Python runtime library, a simulated AOAI region, and a small AMQP broker for Service Bus tests.

- ``python -m devkit serve``: serve the function app in the current folder (as ``func start`` would).
- ``python -m devkit.simulator``: one simulated AOAI region.
"""
