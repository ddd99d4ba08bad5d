"""fastloss benchmarks: pytest-benchmark suites (bench/test_*.py) and the report (python -m bench)."""
