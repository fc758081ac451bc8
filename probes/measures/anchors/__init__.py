"""Sentence anchors: receiver heads, attention suppression, resampling importance."""
