"""Model families that exist only in the tests, to prove the family seam is real (see engine/models/family.py)."""
