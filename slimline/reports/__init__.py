"""Reports: per stage now; comparison and release gate later."""
