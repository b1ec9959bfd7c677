"""Verify a run offline, anchored in what the verifier holds: the auditor of the transcript."""
