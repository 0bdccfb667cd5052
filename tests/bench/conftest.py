"""Bench test fixtures: ``tiny_bundle_h5`` (the tiny NORA-Long fixture exported once per session, fp32, no
validation) lives in tests/conftest.py, shared with the native-runtime tests."""
