"""knowpatch domain: configuration, the editing engine, the ledger and the queue."""
