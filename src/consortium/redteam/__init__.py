"""The privacy red team (issue 8): attacks on a run, and how to read their results.

- ``metrics``: the scoring every membership attack shares (ROC, AUC, TPR at a
  low FPR with exact intervals for both rates) and the ceiling a run's
  (epsilon, delta) puts on any attack's ROC curve.
- ``membership``: the loss-threshold attack and LiRA, whose shadow models
  replay the run's own training on random halves of the sites' records.
- ``inversion``: gradient inversion of one round's update (one site's, the
  secure sum's, with DP), with label recovery and PSNR / per-feature error.
- ``canary``: the one-run DP audit (Steinke, Nasr and Jagielski, 2023).
- ``poisoning``: malicious sites (scaling, sign flip, backdoor) against the
  defences of ``consortium.learning.robust``.
- ``audit`` (``consortium audit``) runs them against a run folder and keeps
  ``audit.json``; ``report`` (``consortium report``) writes the HTML page.
"""
