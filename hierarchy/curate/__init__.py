"""Curation: perceptual hashes, duplicate / placeholder / blank / conflicting-label / leakage
flags, and the review decisions that training honours (``hierarchy curate``, the review page)."""
