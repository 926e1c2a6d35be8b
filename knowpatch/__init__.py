"""The `knowpatch` command: the composition root that wires service/, api/ and workers/ together."""
