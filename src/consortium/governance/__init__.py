"""Governance: the signed consortium agreement, site policies, and the checks that enforce them."""
