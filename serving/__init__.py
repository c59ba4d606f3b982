"""KServe predictor (`python -m serving`): a kserve.Model subclass over onerec's library.

predictor.py: OneRecPredictor; __main__.py: the server entry point; process.py: the server as a
child process (integration tests, benchmarks)."""
