"""Scorers: how well each remaining worker suits a request, in [0, 1]."""
