"""Models, local training and federated strategies."""
