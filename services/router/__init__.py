"""The router: Mirador's front door. Classifies requests into routes, picks the
model, and streams the answer back."""
