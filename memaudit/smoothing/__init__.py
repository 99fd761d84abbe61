"""Smoothing the score as the seed papers define it: power-law temperature targets, kernel smoothing, the kNN graph."""
