"""KServe predictor (`python -m serving`): a kserve.Model subclass over onerec's library.

Built by the serving part of the platform (see README, "Status"); nothing here yet."""
