"""The process that owns the resident model: applies queued edits in ledger order, serves generation."""
