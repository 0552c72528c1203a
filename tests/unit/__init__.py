"""Unit tests, laid out like the package: tests/unit/<folder>/test_<module>.py holds the tests of
llmws_server/<folder>/<module>.py (tests/unit/test_<module>.py those of llmws_server/<module>.py and of the
client modules at the repository's root). They start no server: they call the package in-process, a few on the
tiny random model or the default model's GGUF. The real-server suites are tests/test_*.py."""
