"""Differential privacy: frozen round events, accounting, DP-SGD and each site's own budget ledger."""
