"""The model lifecycle (issue 9): versions, their states, and what a site watches between rounds.

So far: ``registry``, every model version with its hash, parent, round, sites,
privacy cost, evaluation and state (candidate, canary, production, retired,
rolled back), and the moves allowed between states; ``drift``, each site's own
check of its incoming data against its training data. To come: each state
change as a transcript entry, canary evaluation through secure sums, staged
rollout, automatic rollback and the ``consortium models`` command.
"""
