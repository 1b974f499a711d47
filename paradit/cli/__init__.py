"""The command lines' front: flags (typed, translated) and the run spec. No torch at import."""
