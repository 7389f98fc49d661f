"""Pruning stages and their mask maths."""
