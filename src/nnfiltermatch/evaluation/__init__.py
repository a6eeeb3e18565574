"""Scoring segmentations against references: Dice, HD95, ASD, NSD, and the result files."""
