"""Mirador's HTTP gateway: the OpenAI API in front of the router (see app.py)."""
