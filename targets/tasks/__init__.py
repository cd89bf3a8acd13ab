"""The synthetic verifiable reasoning task and the tiny trained models (embedded default)."""
