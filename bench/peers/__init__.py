"""Peers that benches measure Mirador against, built here from source and cached outside the repo."""
