"""knowpatch's HTTP API: validates, records in the ledger, enqueues, forwards generation.

Build it with api.app.create_app; the composition root (service.cli) owns the ledger, queue and
inference backend and passes them in.
"""
