"""The editing engine: AlphaEdit / MEMIT over tensors, modules and plain data.

Nothing here knows about HTTP, SQL or Redis. `types` and `validation` import no torch so that
the API process can check requests without loading it.
"""
