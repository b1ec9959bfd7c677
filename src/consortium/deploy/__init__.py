"""Real deployment: provisioning (a consortium CA and one kit per member)."""
