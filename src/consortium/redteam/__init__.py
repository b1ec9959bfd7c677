"""The privacy red team (issue 8): attacks on a run's model, and how to read their results.

So far: ``metrics``, the scoring every membership attack shares (ROC, AUC,
TPR at a low FPR with an exact confidence interval) and the ceiling that a
run's (epsilon, delta) puts on any attack's ROC curve.
"""
