"""The consensus service: fan a decision out to several models, vote by
confidence, escalate disagreements to a human review queue."""
