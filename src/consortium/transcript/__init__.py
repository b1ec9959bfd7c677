"""The verifiable transcript: an append-only Merkle log (RFC 9162) of everything a run decided."""
