"""Pickers: the one worker, given the scores."""
